"""``lepton bench``: its statistics against numbers worked out by hand, its SSE parsing on crafted
byte streams (split anywhere, errors mid-stream), and a run against a real ``lepton serve``."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from lepton.entrypoints.cli.bench_client import RequestResult, SSEParser, StreamRecorder, send_request
from lepton.entrypoints.cli.bench_stats import format_table, summarize, tpot
from tests.engine import checkpoint
from tests.server.conftest import free_port


# ---- statistics ---------------------------------------------------------------------------------
def hand_results() -> list[RequestResult]:
    """Three successes and a failure; the expected numbers below are worked out by hand."""
    return [RequestResult(10, 5, success=True, ttft=0.1, latency=0.5, output_tokens=5, itl=[0.1] * 4),
            RequestResult(20, 3, success=True, ttft=0.2, latency=1.0, output_tokens=3, itl=[0.3, 0.5]),
            RequestResult(30, 1, success=True, ttft=0.3, latency=0.3, output_tokens=1),
            RequestResult(40, 8, error="HTTP 500: boom", status=500)]


def test_summary_matches_hand_computed_statistics():
    results = hand_results()
    # TPOT = (latency - ttft) / (tokens - 1): (0.5 - 0.1) / 4 and (1.0 - 0.2) / 2; none for 1 token.
    assert [tpot(r) for r in results[:3]] == [pytest.approx(0.1), pytest.approx(0.4), None]
    s = summarize(results, duration=2.0, percentiles=(50, 99))
    assert (s["completed"], s["failed"], s["total_input_tokens"], s["total_output_tokens"]) == (3, 1, 60, 9)
    assert s["request_throughput"] == 1.5 and s["output_throughput"] == 4.5
    assert s["total_token_throughput"] == 34.5
    # Percentile p of n sorted values: linear interpolation at position p / 100 * (n - 1).
    expected = {  # metric: (mean, median, p99) in ms
        "ttft": (200, 200, 200 + 0.98 * 100),            # [100, 200, 300], position 1.98
        "tpot": (250, 250, 100 + 0.99 * 300),            # [100, 400], position 0.99
        "itl": (200, 100, 300 + 0.95 * 200),             # [100 x4, 300, 500], position 4.95
        "e2el": (600, 500, 500 + 0.98 * 500),            # [300, 500, 1000], position 1.98
    }
    for name, (mean, median, p99) in expected.items():
        assert s[f"mean_{name}_ms"] == pytest.approx(mean), name
        assert s[f"median_{name}_ms"] == s[f"p50_{name}_ms"] == pytest.approx(median), name
        assert s[f"p99_{name}_ms"] == pytest.approx(p99), name
    table = format_table(s, {"request_rate": float("inf"), "max_concurrency": 4}, (99,))
    ttft_row = next(line for line in table.splitlines() if line.startswith("TTFT"))
    assert ttft_row.split() == ["TTFT", "200.00", "200.00", "298.00"]
    assert "Maximum request concurrency:" in table and "Failed requests:" in table


def test_summary_without_successes_has_no_latencies():
    s = summarize([RequestResult(4, 4, error="x")], duration=1.0)
    assert s["completed"] == 0 and s["mean_ttft_ms"] is None and s["p99_itl_ms"] is None
    assert "n/a" in format_table(s, {"request_rate": 2.0})


def test_recorder_times_text_chunks_and_reads_usage():
    result = RequestResult(16, 3)
    recorder = StreamRecorder(result, start=10.0)
    chunk = lambda text: json.dumps({"object": "text_completion", "usage": None,
                                     "choices": [{"index": 0, "text": text, "finish_reason": None}]})
    for data, at in [(chunk(""), 10.05), (chunk("a"), 10.1), (chunk("b"), 10.25), (chunk("c"), 10.45),
                     (json.dumps({"choices": [], "usage": {"prompt_tokens": 16, "completion_tokens": 3}}), 10.46),
                     ("[DONE]", 10.46)]:
        recorder.event(data, at)
    recorder.finish(10.5)
    assert result.success and result.generated_text == "abc" and result.output_tokens == 3
    assert result.ttft == pytest.approx(0.1)               # the first chunk with text, not the empty one
    assert result.itl == [pytest.approx(0.15), pytest.approx(0.2)]
    assert result.latency == pytest.approx(0.5) and tpot(result) == pytest.approx(0.2)


# ---- server-sent events -------------------------------------------------------------------------
STREAM = ('data: {"choices": [{"text": "h\u00e9"}]}\n\n'
          ': a comment line\n'
          'event: message\r\ndata: {"choices": [{"text": "\u4e16"}]}\r\n\r\n'
          'data: first line\ndata: second line\n\n'
          'data: [DONE]\n\n').encode()
EVENTS = ['{"choices": [{"text": "h\u00e9"}]}', '{"choices": [{"text": "\u4e16"}]}',
          "first line\nsecond line", "[DONE]"]


def parse(chunks: list[bytes]) -> list[str]:
    parser, events = SSEParser(), []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events + parser.close()


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(STREAM)])
def test_sse_parser_on_any_split(size):
    # Chunks of `size` bytes cut lines, \r\n pairs and multi-byte characters in two.
    assert parse([STREAM[i:i + size] for i in range(0, len(STREAM), size)]) == EVENTS


def test_sse_parser_keeps_an_unterminated_last_event():
    assert parse([b"data: a\n\ndata: [DO", b"NE]"]) == ["a", "[DONE]"]
    assert parse([b"data: x\r"]) == ["x"]


class Chunks(httpx.AsyncByteStream):
    def __init__(self, chunks: list[bytes]):
        self.chunks = chunks

    async def __aiter__(self):
        for chunk in self.chunks:
            yield chunk


def fake_send(status: int, chunks: list[bytes]) -> RequestResult:
    """send_request against a transport that answers with ``chunks``."""
    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["stream"] and body["stream_options"] == {"include_usage": True}
        assert request.headers["authorization"] == "Bearer k"
        return httpx.Response(status, stream=Chunks(chunks), headers={"content-type": "text/event-stream"})

    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            payload = {"prompt": [1, 2], "stream": True, "stream_options": {"include_usage": True}}
            return await send_request(client, "http://x/v1/completions", {"Authorization": "Bearer k"},
                                      payload, RequestResult(2, 2))
    return asyncio.run(go())


def sse(*objects) -> bytes:
    return b"".join(b"data: " + (o if isinstance(o, bytes) else json.dumps(o).encode()) + b"\n\n"
                    for o in objects)


def test_send_request_reads_a_stream_split_mid_line():
    stream = sse({"choices": [{"index": 0, "text": "ab", "finish_reason": None}], "usage": None},
                 {"choices": [{"index": 0, "text": "c", "finish_reason": "length"}], "usage": None},
                 {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 2}}, b"[DONE]")
    result = fake_send(200, [stream[i:i + 5] for i in range(0, len(stream), 5)])
    assert result.success and result.status == 200 and result.error == ""
    assert result.generated_text == "abc" and result.output_tokens == 2 and result.finish_reason == "length"
    assert len(result.itl) == 1 and result.latency >= result.ttft > 0


def test_send_request_fails_on_an_error_event_mid_stream():
    stream = sse({"choices": [{"index": 0, "text": "a"}]},
                 {"error": {"message": "the engine loop failed", "type": "InternalServerError", "code": 500}})
    result = fake_send(200, [stream])
    assert not result.success and "the engine loop failed" in result.error


def test_send_request_records_http_errors_and_broken_streams():
    result = fake_send(400, [b'{"error": {"message": "max_tokens is too large", "code": 400}}'])
    assert not result.success and result.status == 400
    assert result.error == "HTTP 400: max_tokens is too large"
    result = fake_send(200, [sse({"choices": [{"index": 0, "text": "a"}]})])   # no [DONE]
    assert not result.success and "[DONE]" in result.error


# ---- against a real server ----------------------------------------------------------------------
API_KEY = "sk-bench-test"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``python -m lepton serve`` on a tiny Llama and a free port, with an API key; always stopped."""
    model, port = checkpoint(tmp_path_factory, "llama"), free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "LEPTON_API_KEY"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lepton", "serve", str(model), "--port", str(port),
                                 "--api-key", API_KEY, "--max-num-seqs", "8"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"lepton serve exited: {log.read_text()}"
            assert time.monotonic() < deadline, f"lepton serve did not come up: {log.read_text()}"
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        yield base, model
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bench(*args: str, key: str | None = API_KEY, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LEPTON_API_KEY"}
    if key is not None:
        env["LEPTON_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "lepton", "bench", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


def test_bench_against_lepton_serve(server, tmp_path):
    base, model = server
    proc = bench("--base-url", base, "--tokenizer", str(model), "--num-prompts", "8",
                 "--random-input-len", "16", "--random-output-len", "8", "--request-rate", "inf",
                 "--plot", "out.png", "--result-json", "r.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert (result["completed"], result["failed"]) == (8, 0)
    assert result["total_input_tokens"] == 8 * 16 and result["total_output_tokens"] == 64
    assert result["output_lens"] == [8] * 8 and result["errors"] == [""] * 8
    assert 0 < result["mean_ttft_ms"] <= result["mean_e2el_ms"] and result["mean_tpot_ms"] > 0
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for line in ("Successful requests:", "Output token throughput (tok/s):", "TTFT", "TPOT", "ITL"):
        assert line in proc.stdout


def test_bench_rate_limited_with_concurrency_and_text_prompts(server, tmp_path):
    base, _ = server
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello world\nThe quick brown fox\n", encoding="utf-8")
    proc = bench("--base-url", base + "/v1", "--dataset-path", str(prompts), "--num-prompts", "4",
                 "--random-output-len", "5", "--request-rate", "50", "--max-concurrency", "2",
                 "--result-json", str(tmp_path / "r.json"), "--disable-tqdm")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["completed"] == 4 and result["total_output_tokens"] == 20 and result["max_concurrency"] == 2


def test_bench_reports_refused_and_failed_requests(server, tmp_path):
    base, model = server
    proc = bench("--base-url", base, "--tokenizer", str(model), "--num-prompts", "1", key="wrong")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("lepton bench: error: the server refused") and "--api-key" in proc.stderr
    # Prompts longer than the context: every request fails with the server's 400, reported per error.
    proc = bench("--base-url", base, "--tokenizer", str(model), "--num-prompts", "2",
                 "--random-input-len", "300", "--random-output-len", "4", "--disable-tqdm")
    assert proc.returncode == 1
    assert "failed x2: HTTP 400" in proc.stdout and "Failed requests:" in proc.stdout
