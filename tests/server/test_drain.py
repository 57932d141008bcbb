"""Issue 13, item 7: graceful shutdown, against real `lepton serve` processes on loopback.

On SIGTERM, in-flight requests get --timeout-graceful-shutdown seconds to finish. Those that
do, finish as usual; the rest end cleanly: a stream with an error event then ``data: [DONE]``,
a whole response with a JSON 503 error body. No connection is dropped, the log holds no
traceback, and the process exits within 10 s of the signal.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import pytest

from tests.server.conftest import MODEL_NAME, ServerProcess, assert_error

EXIT_WITHIN = 10.0
LONG = 240               # tokens: with --max-num-seqs 1 the queue behind the first takes seconds
EACH = 5                 # streams, and as many whole requests, in flight at the signal


def serve(model_dir, tmp_path_factory, drain: float) -> ServerProcess:
    return ServerProcess(model_dir, ["--max-model-len", "256", "--max-num-seqs", "1", "--served-model-name",
                                     MODEL_NAME, "--timeout-graceful-shutdown", str(drain)],
                         tmp_path_factory.mktemp("drain_logs"))


async def stream(ac: httpx.AsyncClient, prompt: str, max_tokens: int, first: asyncio.Event) -> dict:
    """Outcome of one SSE completion: its data events, parsed, and whether [DONE] came last."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0, "stream": True}
    events, done = [], False
    async with ac.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            first.set()
            assert not done, f"data after [DONE]: {line}"
            if line == "data: [DONE]":
                done = True
            else:
                events.append(json.loads(line[6:]))
    return {"events": events, "done": done}


async def whole(ac: httpx.AsyncClient, prompt: str) -> httpx.Response:
    return await ac.post("/v1/completions", json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": LONG,
                                                  "ignore_eos": True, "temperature": 0})


def exit_after_sigterm(proc: ServerProcess, coroutine_factory):
    """Run the clients; SIGTERM once ``first`` is set; returns (their results, seconds to exit)."""
    exited = []

    async def main():
        first = asyncio.Event()
        async with httpx.AsyncClient(base_url=proc.url, timeout=httpx.Timeout(60.0)) as ac:
            tasks = [asyncio.create_task(c) for c in coroutine_factory(ac, first)]
            started = asyncio.create_task(first.wait())
            await asyncio.wait([started, *tasks], timeout=60, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:   # a client that failed before the signal: report it
                if task.done() and task.exception() is not None:
                    raise task.exception()
            assert started.done(), "no stream started within 60 s"
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            results = await asyncio.wait_for(asyncio.gather(*tasks), EXIT_WITHIN + 20)
        await asyncio.get_running_loop().run_in_executor(None, proc.wait, EXIT_WITHIN + 5)
        exited.append(time.monotonic() - sent)
        return results

    return asyncio.run(main()), exited[0]


def log_of(proc: ServerProcess) -> str:
    proc.stop()
    return proc.log_path.read_text(errors="replace")


def test_sigterm_ends_what_cannot_finish_cleanly(model_dir, tmp_path_factory):
    """One request runs, the others queue behind it; after a 0.5 s drain the rest are cut short,
    each cleanly."""
    proc = serve(model_dir, tmp_path_factory, drain=0.5).start()
    try:
        def clients(ac, first):
            return ([stream(ac, f"Stream {i}", LONG, first) for i in range(EACH)]
                    + [whole(ac, f"Whole {i}") for i in range(EACH)])

        results, exit_seconds = exit_after_sigterm(proc, clients)
    finally:
        log = log_of(proc)
    streams, wholes = results[:EACH], results[EACH:]
    cut_streams = cut_wholes = 0
    for outcome in streams:
        assert outcome["done"], f"a stream ended without [DONE]: {outcome['events'][-1:]}"
        last = outcome["events"][-1]
        if "error" in last:   # cut short: the error is the last event before [DONE]
            assert last["error"]["code"] == 503 and "shutting down" in last["error"]["message"], last
            assert all("choices" in e for e in outcome["events"][:-1])
            cut_streams += 1
        else:                 # it finished within the drain
            assert last["choices"][0]["finish_reason"] == "length", last
    for resp in wholes:
        if resp.status_code == 503:
            assert "shutting down" in assert_error(resp, 503)["message"]
            cut_wholes += 1
        else:
            assert resp.status_code == 200 and resp.json()["choices"][0]["finish_reason"] == "length", resp.text
    # Ten requests of LONG tokens, one at a time, cannot all finish within 0.5 s: both kinds get cut.
    assert cut_streams and cut_wholes, (cut_streams, cut_wholes)
    assert exit_seconds <= EXIT_WITHIN, f"exited {exit_seconds:.1f} s after SIGTERM"
    for marker in ("Traceback", "CancelledError", "Exception in ASGI application"):
        assert marker not in log, f"the server log holds {marker!r}:\n{log[-3000:]}"


def test_requests_that_finish_within_the_drain_finish_normally(model_dir, tmp_path_factory):
    proc = serve(model_dir, tmp_path_factory, drain=8).start()
    try:
        def clients(ac, first):
            return [stream(ac, "Finish me", 120, first)]

        (outcome,), exit_seconds = exit_after_sigterm(proc, clients)
    finally:
        log = log_of(proc)
    assert outcome["done"] and not any("error" in e for e in outcome["events"]), outcome["events"][-2:]
    assert sum(len(e["choices"][0]["text"]) > 0 for e in outcome["events"]) > 0
    assert outcome["events"][-1]["choices"][0]["finish_reason"] == "length"
    assert exit_seconds <= EXIT_WITHIN
    assert "Traceback" not in log, log[-3000:]


@pytest.fixture
def draining(model_dir, tmp_path_factory):
    proc = serve(model_dir, tmp_path_factory, drain=3).start()
    yield proc
    proc.stop()


def test_no_request_is_admitted_while_draining(draining):
    """A kept-alive connection that sends a request after SIGTERM gets 503 (or is closed), never 200."""
    with httpx.Client(base_url=draining.url, timeout=30) as c:
        assert c.get("/health").status_code == 200   # the connection is now open and kept alive

        async def hold():   # a long request keeps the server draining
            async with httpx.AsyncClient(base_url=draining.url, timeout=30) as ac:
                return await whole(ac, "hold the drain open")

        held: list = []
        holder = threading.Thread(target=lambda: held.append(asyncio.run(hold())), daemon=True)
        holder.start()
        time.sleep(0.5)
        draining.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        try:
            late = c.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "late", "max_tokens": 2})
            outcome = late.status_code
            if outcome == 503:
                assert_error(late, 503)
        except httpx.HTTPError:
            outcome = "closed"
        holder.join(EXIT_WITHIN + 10)
    assert outcome in (503, "closed"), outcome
    assert held and held[0].status_code in (200, 503)
