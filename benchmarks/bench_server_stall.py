"""Does one heavy request stall everyone else? /health latency and stream gaps during each one.

    python benchmarks/bench_server_stall.py                  # the tiny test Llama, on the CPU
    python benchmarks/bench_server_stall.py --cases tokenize-1MB --json out.json
    python benchmarks/bench_server_stall.py --server-args --max-prompt-chars 8000000

Starts `lepton serve` on a free loopback port (a tiny random Llama with its byte-level BPE
tokenizer, max_model_len 256, unless --model names a folder), then for each case:
  * a streaming completion runs (new ones are started back to back, eos ignored), and the time
    between its server-sent events is recorded: the inter-token gaps;
  * /health is polled back to back, and each answer's latency is recorded;
  * once the stream flows, the heavy request is sent (from a child process, so that reading its
    answer does not hold up the two threads above); the figures are the maxima over the time it
    took (from sending it to its answer), next to the heavy request's status and duration, and
    when the longest gap ended (seconds after the request was sent).
The "idle" case sends nothing heavy: the machine's own floor. Everything runs on this machine,
on loopback: a loaded machine inflates every figure.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench_throughput import markdown

REPO = Path(__file__).resolve().parents[1]
SENTENCE = "The quick brown fox jumps over the lazy dog. "


def _text(num_chars: int) -> str:
    return (SENTENCE * (num_chars // len(SENTENCE) + 1))[:num_chars]


def _embedding_inputs(model: Path, count: int, max_tokens: int) -> list[str]:
    """``count`` texts of about ``max_tokens`` tokens each (the longest an embedding may be)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    ids = tokenizer(_text(8 * max_tokens), add_special_tokens=False)["input_ids"][:max_tokens - 8]
    base = tokenizer.decode(ids)
    return [f"{i} {base}" for i in range(count)]


def cases(model: Path, max_model_len: int) -> dict[str, tuple[str, dict]]:
    """name -> (path, JSON body) of each heavy request."""
    return {
        "idle": ("", {}),
        "tokenize-1MB": ("/tokenize", {"prompt": _text(1 << 20)}),
        "completions-256x24KB": ("/v1/completions", {"prompt": [_text(24 << 10)] * 256, "max_tokens": 4}),
        "chat-1MB": ("/v1/chat/completions", {"messages": [{"role": "user", "content": _text(1 << 20)}],
                                              "max_tokens": 4}),
        "embeddings-64-long": ("/v1/embeddings", {"input": _embedding_inputs(model, 64, max_model_len)}),
        "detokenize-500k": ("/detokenize", {"tokens": [40, 41, 42, 43, 44] * 100_000}),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, max_model_len: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "lepton", "serve", str(model), "--port", str(port), "--dtype", "float32",
           "--max-model-len", str(max_model_len), "--max-num-seqs", "16", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit("the server did not start in 180 s")


class Streamer(threading.Thread):
    """Streams completions back to back; ``events`` holds (stream number, arrival time)."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.events, self.stop = url, [], threading.Event()

    def run(self) -> None:
        body = {"prompt": "Hello", "max_tokens": 200, "ignore_eos": True, "stream": True, "temperature": 0}
        number = 0
        with httpx.Client(timeout=120.0) as client:
            while not self.stop.is_set():
                number += 1
                with client.stream("POST", f"{self.url}/v1/completions", json=body) as resp:
                    for line in resp.iter_lines():
                        if line.startswith("data: {"):
                            self.events.append((number, time.monotonic()))
                        if self.stop.is_set():
                            break

    def max_gap(self, start: float, end: float) -> tuple[float, float]:
        """The longest wait for a token of the same stream that arrived in [start, end] (the
        wait is counted even when it began before start), and when it ended."""
        gaps = [(t - prev_t, t) for (n, t), (prev_n, prev_t) in zip(self.events[1:], self.events)
                if n == prev_n and t >= start and prev_t <= end]
        return max(gaps, default=(float("nan"), float("nan")))


class HealthPoller(threading.Thread):
    """GET /health back to back; ``samples`` holds (sent, latency)."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.samples, self.stop = url, [], threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=60.0) as client:
            while not self.stop.is_set():
                sent = time.monotonic()
                client.get(f"{self.url}/health")
                self.samples.append((sent, time.monotonic() - sent))
                time.sleep(0.005)

    def max_latency(self, start: float, end: float) -> float:
        return max((lat for sent, lat in self.samples if sent + lat >= start and sent <= end), default=float("nan"))


def _send(url: str, payload: bytes, go, answer) -> None:
    """(Child process.) POST the heavy request once ``go`` is set; (status, sent, answered) go
    back through ``answer`` (time.monotonic is the machine's clock, the same in both processes)."""
    with httpx.Client(timeout=300.0) as client:
        go.wait()
        sent = time.monotonic()
        resp = client.post(url, content=payload, headers={"Content-Type": "application/json"})
        answer.put((resp.status_code, sent, time.monotonic()))


def run_case(url: str, path: str, body: dict, idle_seconds: float) -> dict:
    streamer, poller = Streamer(url), HealthPoller(url)
    streamer.start()
    poller.start()
    while len(streamer.events) < 10:   # the stream flows before the heavy request is sent
        time.sleep(0.01)
    payload = json.dumps(body).encode() if path else b""
    if path:
        spawn = multiprocessing.get_context("spawn")
        go, answer = spawn.Event(), spawn.Queue()
        sender = spawn.Process(target=_send, args=(f"{url}{path}", payload, go, answer))
        sender.start()
        go.set()
        status, start, end = answer.get(timeout=300)
        sender.join(60)
    else:
        start = time.monotonic()
        time.sleep(idle_seconds)
        status, end = None, time.monotonic()
    time.sleep(0.2)
    streamer.stop.set()
    poller.stop.set()
    streamer.join(60)
    poller.join(60)
    gap, gap_end = streamer.max_gap(start, end)
    return {"status": status, "request_MB": round(len(payload) / 1e6, 2), "request_s": round(end - start, 3),
            "max_health_ms": round(1e3 * poller.max_latency(start, end), 1),
            "max_token_gap_ms": round(1e3 * gap, 1), "gap_at_s": round(gap_end - start, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="a model folder (default: the tiny test Llama, built now)")
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--cases", nargs="+", help="run only these (default: all)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per case (the worst is reported)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--server-args", nargs=argparse.REMAINDER, default=[], help="more `lepton serve` flags")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            sys.path.insert(0, str(REPO))
            from tests.models.conftest import make_checkpoint

            model = make_checkpoint(tmp, "llama")
        proc, url = start_server(model, args.max_model_len, args.server_args)
        try:
            rows = []
            for name, (path, body) in cases(model, args.max_model_len).items():
                if args.cases and name not in args.cases:
                    continue
                runs = [run_case(url, path, body, idle_seconds=1.0) for _ in range(args.repeats)]
                worst = max(runs, key=lambda r: (r["max_health_ms"], r["max_token_gap_ms"]))
                rows.append({"case": name, **worst})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
