"""A second server for what would disturb the shared one: default host, API keys from the
LEPTON_API_KEY environment variable, generation_config.json defaults, the tokenizer's own chat
template, 429 past --max-pending, then SIGTERM with streams in flight; and a third server that
gets SIGINT while idle. Each must exit within 10 s of the signal."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import threading
import time

import httpx
import pytest

from tests.server.conftest import ServerProcess, assert_error, auth, chat_ids, wait_idle

ENV_KEYS = ("env-key-a", "env-key-b")
MESSAGES = [{"role": "user", "content": "Hello world! How are you today?"}]
MAX_PENDING = 2
EXIT_WITHIN = 10.0


@pytest.fixture(scope="module")
def gen_config_dir(model_dir, tmp_path_factory):
    """The checkpoint with generation_config.json asking for top_k=1: sampling defaults to greedy."""
    folder = tmp_path_factory.mktemp("gencfg") / "ckpt"
    shutil.copytree(model_dir, folder)
    path = folder / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    config["top_k"] = 1
    path.write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def server2(gen_config_dir, tmp_path_factory):
    # No --host (127.0.0.1 is the default), no --served-model-name, keys from the environment.
    with ServerProcess(gen_config_dir, ["--max-num-seqs", "1", "--max-pending", str(MAX_PENDING),
                                        "--max-model-len", "256", "--metrics-public"],
                       tmp_path_factory.mktemp("server2_logs"), host=None,
                       env={"LEPTON_API_KEY": ",".join(ENV_KEYS)}) as proc:
        yield proc


@pytest.fixture(scope="module")
def name2(server2) -> str:
    resp = httpx.get(f"{server2.url}/v1/models", headers=auth(ENV_KEYS[0]), timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()["data"][0]["id"]


def complete(server, name, key=ENV_KEYS[0], **fields) -> httpx.Response:
    body = {"model": name, "prompt": "The quick brown fox", "max_tokens": 4, **fields}
    return httpx.post(f"{server.url}/v1/completions", json=body, headers=auth(key), timeout=60)


def test_default_host_is_loopback(server2):
    assert server2.ready_line is not None, server2.output_tail()
    assert f"ready at http://127.0.0.1:{server2.port}" in server2.ready_line, server2.ready_line


def test_default_served_name_is_the_folder_name(name2, gen_config_dir):
    assert name2 == gen_config_dir.name


def test_keys_from_environment(server2, name2):
    for key in ENV_KEYS:
        assert complete(server2, name2, key=key).status_code == 200, key
    assert_error(httpx.get(f"{server2.url}/v1/models", timeout=30), 401)
    assert_error(complete(server2, name2, key="env-key-c"), 401)
    assert httpx.get(f"{server2.url}/health", timeout=30).status_code == 200


def test_generation_config_defaults(server2, name2):
    """No temperature / top_k in the request: generation_config.json's top_k=1 makes it greedy."""
    default = complete(server2, name2, max_tokens=16, ignore_eos=True).json()["choices"][0]["text"]
    greedy = complete(server2, name2, max_tokens=16, ignore_eos=True, temperature=0).json()["choices"][0]["text"]
    assert default == greedy
    # An explicit field still wins over the checkpoint's default.
    sampled = [complete(server2, name2, max_tokens=16, ignore_eos=True, temperature=1.0, top_k=-1, seed=s)
               .json()["choices"][0]["text"] for s in range(4)]
    assert any(s != greedy for s in sampled)


def test_tokenizer_chat_template(server2, tokenizer):
    resp = httpx.post(f"{server2.url}/tokenize", json={"messages": MESSAGES}, headers=auth(ENV_KEYS[1]), timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.json()["tokens"] == chat_ids(tokenizer, MESSAGES)


def test_more_prompts_than_max_pending_is_413_not_429(server2, name2):
    """A request that could never be queued whole is refused for good, not told to retry."""
    with httpx.Client(base_url=server2.url, headers=auth(ENV_KEYS[0]), timeout=60) as c:
        resp = c.post("/v1/completions", json={"model": name2, "prompt": ["a"] * (MAX_PENDING + 1), "max_tokens": 1})
        err = assert_error(resp, 413)
        assert str(MAX_PENDING) in err["message"] and "--max-pending" in err["message"]
        ok = c.post("/v1/completions", json={"model": name2, "prompt": ["a"] * MAX_PENDING, "max_tokens": 1})
        assert ok.status_code == 200, ok.text[:300]


def test_429_past_max_pending(server2, name2):
    async def one(ac):
        return await ac.post("/v1/completions", json={"model": name2, "prompt": "The quick brown fox",
                                                      "max_tokens": 120, "ignore_eos": True, "temperature": 0})

    async def main():
        async with httpx.AsyncClient(base_url=server2.url, headers=auth(ENV_KEYS[0]), timeout=120) as ac:
            return await asyncio.wait_for(asyncio.gather(*(one(ac) for _ in range(12))), 120)

    responses = asyncio.run(main())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(429) >= 12 - (1 + MAX_PENDING), f"1 running + {MAX_PENDING} queued at most: {codes}"
    assert codes.count(200) >= 1, codes
    for r in responses:
        if r.status_code == 429:
            assert_error(r, 429)
    wait_idle(server2.url, timeout=10)
    assert complete(server2, name2).status_code == 200


def test_sigterm_with_streams_in_flight(server2, name2):
    exited_at: list[float] = []

    async def stream(ac, i, got_chunk):
        body = {"model": name2, "prompt": f"Stream {i}: the quick brown fox", "max_tokens": 200,
                "ignore_eos": True, "temperature": 0, "stream": True}
        try:
            async with ac.stream("POST", "/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    return f"status {resp.status_code}"
                async for line in resp.aiter_lines():
                    if line.startswith("data: "):
                        got_chunk.set()
                        if line == "data: [DONE]":
                            return "finished"
                return "closed"
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError) as err:
            return f"closed ({type(err).__name__})"

    def wait_exit(proc):
        try:
            proc.wait(60)
        finally:
            exited_at.append(time.monotonic())

    async def main():
        events = [asyncio.Event() for _ in range(3)]
        async with httpx.AsyncClient(base_url=server2.url, headers=auth(ENV_KEYS[0]),
                                     timeout=httpx.Timeout(30.0)) as ac:
            tasks = [asyncio.create_task(stream(ac, i, events[i])) for i in range(3)]
            await asyncio.wait_for(events[0].wait(), 30)
            sent = time.monotonic()
            server2.send_signal(signal.SIGTERM)
            waiter = threading.Thread(target=wait_exit, args=(server2.proc,), daemon=True)
            waiter.start()
            # Stop admitting: a new connection is refused, or answered with an error.
            await asyncio.sleep(0.3)
            try:
                async with httpx.AsyncClient(timeout=10) as fresh:
                    late = await fresh.post(f"{server2.url}/v1/completions", headers=auth(ENV_KEYS[0]),
                                            json={"model": name2, "prompt": "late", "max_tokens": 2})
                late_outcome = f"status {late.status_code}"
            except httpx.HTTPError as err:
                late_outcome = f"refused ({type(err).__name__})"
            outcomes = await asyncio.wait_for(asyncio.gather(*tasks), EXIT_WITHIN + 20)
            return sent, outcomes, late_outcome, waiter

    sent, outcomes, late_outcome, waiter = asyncio.run(main())
    waiter.join(max(0.0, sent + EXIT_WITHIN + 1 - time.monotonic()))
    assert exited_at, f"still running {EXIT_WITHIN:.0f} s after SIGTERM\n{server2.output_tail()}"
    assert exited_at[0] - sent <= EXIT_WITHIN, f"exited {exited_at[0] - sent:.1f} s after SIGTERM"
    assert all(o == "finished" or o.startswith("closed") or o == "status 503" for o in outcomes), outcomes
    assert late_outcome != "status 200", "a request was admitted after SIGTERM"


def test_sigint_when_idle(model_dir, tmp_path_factory):
    proc = ServerProcess(model_dir, ["--max-model-len", "128"], tmp_path_factory.mktemp("server3_logs"))
    try:
        proc.start()
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(EXIT_WITHIN)
        except Exception:
            pytest.fail(f"still running {EXIT_WITHIN:.0f} s after SIGINT\n{proc.output_tail()}")
        assert time.monotonic() - sent <= EXIT_WITHIN
    finally:
        proc.stop()
