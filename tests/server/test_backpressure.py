"""Issue 13, item 5: a client that never reads its stream cannot make the server hold unbounded
output. Against real `lepton serve` processes on loopback, with raw sockets that send a
streaming request and then do not read (their receive buffer made small, so the server's writes
back up at once).

With 20 top logprobs a streamed chat token is about 4.5 KiB; past the kernel's and the
transport's buffers (a few MB on loopback) the outputs queue in the server. --max-stream-buffer-tokens bounds that
queue: past it the request is aborted (its KV blocks freed) and counted in
lepton_stream_backpressure_aborts_total; its stream ends with an error event. Finished requests
whose client has not read them yet still hold their output, and count toward --max-pending.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.server.conftest import ServerProcess, assert_error, read_metrics

MAX_MODEL_LEN = 1024
BUFFER_TOKENS = 64
CHAT = "/v1/chat/completions"
# n=4 samples x 900 tokens x 20 top logprobs: about 16 MB of stream, far past the socket buffers
# (the server's send buffer alone may grow to 4 MB).
FLOOD = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 900, "n": 4, "logprobs": True,
         "top_logprobs": 20, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    from tests.models.conftest import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("long_ckpt"), "llama", max_position_embeddings=MAX_MODEL_LEN)


def serve(model, tmp_path_factory, *flags) -> ServerProcess:
    args = ["--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "8", "--dtype", "float32", *flags]
    return ServerProcess(model, args, tmp_path_factory.mktemp("backpressure_logs"))


@pytest.fixture(scope="module")
def small_buffer(long_model, tmp_path_factory):
    with serve(long_model, tmp_path_factory, "--max-stream-buffer-tokens", str(BUFFER_TOKENS)) as proc:
        yield proc


@pytest.fixture(scope="module")
def two_pending(long_model, tmp_path_factory):
    with serve(long_model, tmp_path_factory, "--max-pending", "2", "--max-stream-buffer-tokens", "100000") as proc:
        yield proc


def send_and_never_read(server: ServerProcess, body: dict) -> socket.socket:
    """A raw connection that sends one request and reads nothing (until read_all)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # before connect: the window stays small
    sock.connect(("127.0.0.1", server.port))
    payload = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    return sock


def read_all(sock: socket.socket, timeout: float = 120.0) -> tuple[bytes, list]:
    """Read the whole chunked response now: (status line, the SSE data payloads in order)."""
    sock.settimeout(timeout)
    data = b""
    while not data.endswith(b"\r\n0\r\n\r\n"):
        piece = sock.recv(1 << 20)
        if not piece:
            break
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    text, rest = b"", body
    while rest:   # chunked transfer encoding: "<hex size>\r\n<data>\r\n" ... "0\r\n\r\n"
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        text, rest = text + rest[:size], rest[size + 2:]
    events = [line[len("data: "):] for line in text.decode().split("\n") if line.startswith("data: ")]
    return head.split(b"\r\n", 1)[0], [e if e == "[DONE]" else json.loads(e) for e in events]


def wait_metric(url: str, name: str, want, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        values = read_metrics(url)
        if want(values.get(name, 0.0)):
            return values
        assert time.monotonic() < deadline, f"{name} is {values.get(name)} after {timeout:.0f} s"
        time.sleep(0.05)


def test_a_client_that_never_reads_gets_its_stream_aborted(small_buffer):
    url = small_buffer.url
    before = read_metrics(url)
    sock = send_and_never_read(small_buffer, FLOOD)
    try:
        after = wait_metric(url, "lepton_stream_backpressure_aborts_total",
                            lambda v: v >= before.get("lepton_stream_backpressure_aborts_total", 0) + 1)
        idle = wait_metric(url, "lepton_requests_running", lambda v: v == 0)
        assert idle["lepton_kv_cache_usage"] == 0.0   # its blocks are free again
        assert after["lepton_requests_aborted_total"] == before["lepton_requests_aborted_total"] + 1
        generated = idle["lepton_generation_tokens_total"] - before["lepton_generation_tokens_total"]
        assert 0 < generated < FLOOD["n"] * FLOOD["max_tokens"]   # stopped early
        # What waits for the client is bounded: at most the limit (plus the step that crossed it).
        assert idle["lepton_stream_buffered_tokens"] <= BUFFER_TOKENS + FLOOD["n"]
        status, events = read_all(sock)
    finally:
        sock.close()
    assert status.endswith(b" 200 OK")
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["code"] == "stream_buffer_full" and "--max-stream-buffer-tokens" in error["message"], error
    chunks = events[:-2]
    assert {c["choices"][0]["finish_reason"] for c in chunks} <= {None, "abort"}
    # Nothing generated was lost: every token reached the client once it read.
    assert sum(len(c["choices"][0]["logprobs"]["content"]) for c in chunks) == generated
    wait_metric(url, "lepton_stream_buffered_tokens", lambda v: v == 0)


def test_a_client_that_reads_is_not_aborted(small_buffer):
    """The same limit, a client that reads as the tokens come: the whole answer, no abort."""
    url = small_buffer.url
    before = read_metrics(url)
    body = dict(FLOOD, n=1, max_tokens=300)
    with httpx.Client(timeout=120.0) as c, c.stream("POST", f"{url}{CHAT}", json=body) as resp:
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert lines[-1] == "data: [DONE]" and all("error" not in c for c in chunks)
    assert sum(len(c["choices"][0]["logprobs"]["content"]) for c in chunks) == 300
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    after = read_metrics(url)
    assert after["lepton_stream_backpressure_aborts_total"] == before["lepton_stream_backpressure_aborts_total"]


def test_finished_but_unread_requests_count_toward_max_pending(two_pending):
    url = two_pending.url
    socks = [send_and_never_read(two_pending, FLOOD) for _ in range(2)]
    try:
        values = wait_metric(url, "lepton_requests_unread", lambda v: v == 2)
        assert values["lepton_requests_waiting"] == 0 and values["lepton_requests_running"] == 0
        assert values["lepton_stream_backpressure_aborts_total"] == 0   # they finished: length
        assert values["lepton_stream_buffered_tokens"] > 0
        small = {"prompt": "Hi", "max_tokens": 2}
        err = assert_error(httpx.post(f"{url}/v1/completions", json=small, timeout=60.0), 429)
        assert "unread" in err["message"]
        status, events = read_all(socks[0])   # one client reads its answer: room for one more
        assert status.endswith(b" 200 OK") and events[-1] == "[DONE]"
        finish = {c["choices"][0]["finish_reason"] for c in events[:-1]} - {None}
        assert finish == {"length"}
        wait_metric(url, "lepton_requests_unread", lambda v: v == 1)
        assert httpx.post(f"{url}/v1/completions", json=small, timeout=60.0).status_code == 200
    finally:
        for sock in socks:
            sock.close()
    # A client that leaves without reading frees its place too.
    wait_metric(url, "lepton_requests_unread", lambda v: v == 0)
    wait_metric(url, "lepton_stream_buffered_tokens", lambda v: v == 0)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_a_client_that_leaves_unread_leaves_nothing_behind(small_buffer, stream):
    """Sent, running, then the connection closed without a byte read: the request is aborted,
    and nothing of it stays counted as unread or buffered."""
    url = small_buffer.url
    before = read_metrics(url)
    sock = send_and_never_read(small_buffer, dict(FLOOD, n=1, stream=stream))
    try:
        wait_metric(url, "lepton_generation_tokens_total", lambda v: v > before["lepton_generation_tokens_total"])
    finally:
        sock.close()
    wait_metric(url, "lepton_requests_aborted_total", lambda v: v == before["lepton_requests_aborted_total"] + 1)
    values = wait_metric(url, "lepton_requests_running", lambda v: v == 0)
    assert values["lepton_requests_unread"] == 0 and values["lepton_stream_buffered_tokens"] == 0
    assert values["lepton_kv_cache_usage"] == 0.0
    generated = values["lepton_generation_tokens_total"] - before["lepton_generation_tokens_total"]
    assert generated < FLOOD["max_tokens"]   # cut short, not run to its end
