"""Issue 13, item 4: one user's heavy request does not stall the others, against a real
`lepton serve` process on loopback.

Tokenizing and chat templating run off the event loop: while a prompt of about 2 MB is being
tokenized, /health answers and a running stream keeps receiving tokens. The size limits
(--max-prompts, --max-prompt-chars) are checked before anything is tokenized: the server's
``lepton_tokenized_chars_total`` counter (text handed to the tokenizer) does not move for a
request they refuse. How fast the loop answers is measured by benchmarks/bench_server_stall.py,
not asserted here.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.server.conftest import API_KEY, MAX_MODEL_LEN, MODEL_NAME, ServerProcess, assert_error, auth, read_metrics

CHARS = "lepton_tokenized_chars_total"
DEFAULT_MAX_PROMPT_CHARS = 2 << 20          # lepton serve's default --max-prompt-chars
BIG = 2_000_000                              # characters: under that default, ~1 s or more to tokenize
SENTENCE = "The quick brown fox jumps over the lazy dog. "


def text(num_chars: int) -> str:
    return (SENTENCE * (num_chars // len(SENTENCE) + 1))[:num_chars]


def tokenized(url: str) -> float:
    return read_metrics(url).get(CHARS, 0.0)


class Heavy(threading.Thread):
    """One request sent from a thread; ``response`` once it is answered."""

    def __init__(self, url: str, path: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.path, self.body, self.response = url, path, body, None

    def run(self) -> None:
        with httpx.Client(base_url=self.url, headers=auth(API_KEY), timeout=120.0) as c:
            self.response = c.post(self.path, json=self.body)


def wait_for_tokenizing(url: str, before: float, num_chars: int, heavy: Heavy) -> None:
    """Until the server has handed the heavy request's text to its tokenizer (the counter moves
    just before tokenizing starts). Scraping /metrics itself needs the loop, so a loop blocked by
    the tokenizer would only show it once the request is done."""
    deadline = time.monotonic() + 60
    while tokenized(url) < before + num_chars:
        assert heavy.is_alive(), f"the request ended before it was tokenized: {heavy.response}"
        assert time.monotonic() < deadline, "the server never started tokenizing"
        time.sleep(0.01)


HEAVY_CASES = {
    "tokenize-prompt": ("/tokenize", {"model": MODEL_NAME, "prompt": text(BIG)}, 200),
    "tokenize-messages": ("/tokenize", {"model": MODEL_NAME, "messages": [{"role": "user", "content": text(BIG)}]}, 200),
    # Rendered by the chat template and tokenized, then refused: far longer than max_model_len.
    "chat-messages": ("/v1/chat/completions",
                      {"model": MODEL_NAME, "messages": [{"role": "user", "content": text(BIG)}]}, 400),
}


@pytest.mark.parametrize("case", list(HEAVY_CASES))
def test_health_and_streams_are_served_while_a_huge_prompt_is_tokenized(server, case):
    path, body, status = HEAVY_CASES[case]
    num_chars = BIG if "prompt" in body else sum(len(m["role"]) + len(m["content"]) for m in body["messages"])
    tokens_seen: list[float] = []
    stream_done = threading.Event()

    def stream():
        with httpx.Client(base_url=server.url, headers=auth(API_KEY), timeout=120.0) as c:
            with c.stream("POST", "/v1/completions", json={
                    "model": MODEL_NAME, "prompt": "Hello", "max_tokens": MAX_MODEL_LEN - 8, "ignore_eos": True,
                    "stream": True}) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: {"):
                        tokens_seen.append(time.monotonic())
                    if stream_done.is_set():
                        break

    streamer = threading.Thread(target=stream, daemon=True)
    streamer.start()
    try:
        while len(tokens_seen) < 3:   # the stream flows before the heavy request goes out
            assert streamer.is_alive(), "the stream ended early"
            time.sleep(0.01)
        before = tokenized(server.url)
        heavy = Heavy(server.url, path, body)
        heavy.start()
        wait_for_tokenizing(server.url, before, num_chars, heavy)
        tokens_before = len(tokens_seen)
        health = [httpx.get(f"{server.url}/health", timeout=60.0).status_code for _ in range(3)]
        deadline = time.monotonic() + 30
        while len(tokens_seen) == tokens_before and heavy.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        streamed_meanwhile = len(tokens_seen) > tokens_before
        still_tokenizing = heavy.is_alive()
    finally:
        stream_done.set()
    heavy.join(120)
    streamer.join(60)
    assert health == [200, 200, 200]
    assert still_tokenizing, "the heavy request was answered before the probes: the loop waited for it"
    assert streamed_meanwhile, "the running stream got no token while the prompt was tokenized"
    assert heavy.response is not None and heavy.response.status_code == status, heavy.response
    if status == 200:
        assert heavy.response.json()["count"] > MAX_MODEL_LEN   # really tokenized, all of it


# ---- limits before tokenizing -----------------------------------------------------------------------
OVER = DEFAULT_MAX_PROMPT_CHARS + 1
LIMIT_CASES = {
    # Issue 13's example: 256 prompts of 24 KiB (6 MB), each far too long for the model anyway.
    "completions-256-prompts": ("/v1/completions", {"prompt": [text(24 << 10)] * 256, "max_tokens": 1}, "prompt"),
    "completions-one-prompt": ("/v1/completions", {"prompt": text(OVER), "max_tokens": 1}, "prompt"),
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": text(OVER)}]}, "messages"),
    "chat-content-parts": ("/v1/chat/completions", {"messages": [
        {"role": "user", "content": [{"type": "text", "text": text(OVER // 2 + 1)}] * 2}]}, "messages"),
    "embeddings": ("/v1/embeddings", {"input": [text(OVER // 4 + 1)] * 4}, "input"),
    "tokenize-prompt": ("/tokenize", {"prompt": text(OVER)}, "prompt"),
    "tokenize-messages": ("/tokenize", {"messages": [{"role": "user", "content": text(OVER // 2)}] * 3}, "messages"),
}


@pytest.mark.parametrize("case", list(LIMIT_CASES))
def test_too_much_text_is_413_before_anything_is_tokenized(server, http, case):
    path, body, param = LIMIT_CASES[case]
    before = tokenized(server.url)
    err = assert_error(http.post(path, json={"model": MODEL_NAME, **body}), 413)
    assert err["param"] == param and "--max-prompt-chars" in err["message"], err
    assert tokenized(server.url) == before   # refused before the tokenizer saw any of it


def test_too_many_prompts_is_413_before_anything_is_tokenized(server, http):
    before = tokenized(server.url)
    err = assert_error(http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": ["hi"] * 257}), 413)
    assert err["param"] == "prompt"
    assert tokenized(server.url) == before


def test_the_first_prompt_too_long_for_the_model_ends_the_work(server, http):
    """Prompts are tokenized one by one and checked as they are: three prompts too long for
    max_model_len cost the tokenizing of the first only."""
    prompts = [text(20_000)] * 3
    before = tokenized(server.url)
    err = assert_error(http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": prompts}), 400)
    assert "prompt 0" in err["message"] and "max_model_len" in err["message"], err
    assert tokenized(server.url) == before + len(prompts[0])


def test_text_that_is_tokenized_is_counted(server, http):
    """The counter the tests above rely on counts every character handed to the tokenizer."""
    before = tokenized(server.url)
    assert http.post("/tokenize", json={"model": MODEL_NAME, "prompt": "hello there"}).status_code == 200
    for prompt in (["ab", "cde"], [[5, 6], [7]]):   # token ids are not tokenized
        resp = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 1})
        assert resp.status_code == 200, resp.text[:300]
    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "fgh"}], "max_tokens": 1}
    assert http.post("/v1/chat/completions", json=chat).status_code == 200
    assert http.post("/v1/embeddings", json={"model": MODEL_NAME, "input": ["ijkl"]}).status_code == 200
    expected = len("hello there") + len("ab") + len("cde") + len("user") + len("fgh") + len("ijkl")
    assert tokenized(server.url) == before + expected


def test_big_answers_are_the_json_they_were(server, http, tokenizer):
    """/tokenize and /detokenize answers built off the loop: still exactly the tokenizer's."""
    prompt = text(300_000) + " 这是一个示例文本。\n"
    got = http.post("/tokenize", json={"model": MODEL_NAME, "prompt": prompt}).json()
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    assert got == {"tokens": ids, "count": len(ids), "max_model_len": MAX_MODEL_LEN}
    resp = http.post("/detokenize", json={"model": MODEL_NAME, "tokens": ids})
    assert resp.status_code == 200 and resp.json() == {"prompt": tokenizer.decode(ids)}
    assert resp.headers["content-type"] == "application/json"


@pytest.fixture(scope="module")
def small_limit_server(model_dir, tmp_path_factory):
    args = ["--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "4", "--dtype", "float32",
            "--max-prompt-chars", "100"]
    with ServerProcess(model_dir, args, tmp_path_factory.mktemp("limit_logs")) as proc:
        yield proc


@pytest.mark.parametrize("path,field,at_limit,over", [
    ("/v1/completions", "prompt", {"prompt": ["a" * 60, "b" * 40], "max_tokens": 1},
     {"prompt": ["a" * 61, "b" * 40], "max_tokens": 1}),
    ("/v1/chat/completions", "messages", {"messages": [{"role": "user", "content": "c" * 96}], "max_tokens": 1},
     {"messages": [{"role": "user", "content": "c" * 97}], "max_tokens": 1}),
    ("/v1/embeddings", "input", {"input": "d" * 100}, {"input": "d" * 101}),
    ("/tokenize", "prompt", {"prompt": "e" * 100}, {"prompt": "e" * 101}),
], ids=["completions", "chat", "embeddings", "tokenize"])
def test_the_max_prompt_chars_flag(small_limit_server, path, field, at_limit, over):
    """--max-prompt-chars 100: 100 characters in all (a message's role counts) pass, 101 do not."""
    with httpx.Client(base_url=small_limit_server.url, timeout=60.0) as c:
        ok = c.post(path, json=at_limit)
        assert ok.status_code == 200, ok.text[:300]
        err = assert_error(c.post(path, json=over), 413)
    assert err["param"] == field and "(100, --max-prompt-chars)" in err["message"], err
