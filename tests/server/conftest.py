"""Fixtures of the server tests: a tiny random Llama checkpoint (with its byte-level BPE tokenizer
and chat template), `python -m lepton serve` started on a free loopback port as a subprocess,
and helpers to read /metrics and check error bodies.

The ``server`` fixture is session-scoped: every test file of this directory shares one process.
Its teardown always terminates the process (then kills it), whatever the tests did.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]

MODEL_NAME = "tiny-llama"          # --served-model-name, the first one: what /v1/models shows
MODEL_ALIAS = "tiny-alias"         # a second --served-model-name, accepted as `model` too
API_KEY = "sk-lepton-test-1"
API_KEY_2 = "sk-lepton-test-2"     # a second --api-key
MAX_MODEL_LEN = 256
MAX_NUM_SEQS = 16
HIDDEN_SIZE = 256                  # tests.models.conftest's tiny Llama
START_TIMEOUT = 120.0

# --chat-template FILE of the shared server: visibly different from the tokenizer's own template
# (tests.models.conftest.CHAT_TEMPLATE), so /tokenize and usage tell which one was applied.
OVERRIDE_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}[assistant] {% endif %}")

METRIC_NAMES = ("lepton_requests_running", "lepton_requests_waiting", "lepton_kv_cache_usage",
                "lepton_prefix_cache_hit_rate", "lepton_preemptions_total", "lepton_prompt_tokens_total",
                "lepton_generation_tokens_total", "lepton_time_to_first_token_seconds_bucket",
                "lepton_inter_token_latency_seconds_bucket", "lepton_e2e_request_latency_seconds_bucket")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999   # Linux's default


_GIVEN: set[int] = set()


def free_port() -> int:
    """A loopback port free now and outside the kernel's ephemeral range. A port bound to 0 and
    released comes from that range, and until the server binds it (after loading a model) any
    socket that binds port 0 meanwhile (gloo's connections in the tensor-parallel tests, a
    client's) may be handed the same port: the server then fails with "address in use"."""
    low, high = _ephemeral_range()
    candidates = [p for p in range(20000, 32768) if p < low or p > high] or list(range(high + 1, 65536))
    for port in random.Random().sample(candidates, min(len(candidates), 200)):
        if port in _GIVEN:   # handed out already (two ports for one test must differ)
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:   # all taken: any free port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m lepton serve MODEL --port P [--host H] ARGS...` as a child process.

    stdout is read line by line by a thread (the ready line is looked for there); stderr goes to
    a log file. ``stop()`` terminates, then kills; it is safe to call twice.
    """

    def __init__(self, model: Path, args: list[str], log_dir: Path, *, host: str | None = "127.0.0.1",
                 env: dict[str, str] | None = None):
        self.port = free_port()
        self.host = host or "127.0.0.1"
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "lepton", "serve", str(model), "--port", str(self.port)]
        if host is not None:
            self.cmd += ["--host", host]
        self.cmd += list(args)
        self.env = {k: v for k, v in os.environ.items() if k != "LEPTON_API_KEY"}
        self.env.update(env or {})
        self.env["PYTHONUNBUFFERED"] = "1"
        self.log_path = Path(log_dir) / f"lepton-serve-{self.port}.stderr.log"
        self.stdout_lines: list[str] = []
        self.ready_line: str | None = None
        self._ready = threading.Event()
        self.proc: subprocess.Popen | None = None
        self._log = None
        self._reader: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT) -> "ServerProcess":
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                                     stderr=self._log, stdin=subprocess.DEVNULL, text=True,
                                     encoding="utf-8", errors="replace", bufsize=1)
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout_lines.append(line)
            if self.ready_line is None and "ready at http://" in line:
                self.ready_line = line.strip()
                self._ready.set()

    def _health_ok(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def _wait_ready(self, timeout: float) -> None:
        """Until the ready line is printed, or /health answers 200 (then the ready line gets 5 s
        more: its absence is reported by a test, not by every test)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._ready.wait(0.25):
                return
            if self.proc.poll() is not None:
                pytest.fail(f"`{' '.join(self.cmd[1:])}` exited with {self.proc.returncode} before it was "
                            f"ready\n{self.output_tail()}", pytrace=False)
            if self._health_ok():
                self._ready.wait(5.0)
                return
        pytest.fail(f"`{' '.join(self.cmd[1:])}` not ready after {timeout:.0f} s\n{self.output_tail()}",
                    pytrace=False)

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def __enter__(self) -> "ServerProcess":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(15)
        if self._reader is not None:
            self._reader.join(5)
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()
        if self._log is not None and not self._log.closed:
            self._log.close()

    # -- diagnostics -------------------------------------------------------------------------
    def output_tail(self, lines: int = 40) -> str:
        out = "".join(self.stdout_lines[-lines:])
        try:
            err = "".join(self.log_path.read_text(errors="replace").splitlines(True)[-lines:])
        except OSError:
            err = ""
        return f"--- server stdout (tail) ---\n{out}\n--- server stderr (tail) ---\n{err}"


# -- checkpoint and tokenizer -----------------------------------------------------------------------

@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    from tests.models.conftest import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("server_ckpt"), "llama")


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def prompt_ids(tokenizer, text: str) -> list[int]:
    """A completion prompt's token ids as the server should count them (special tokens added)."""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def chat_ids(tokenizer, messages: list[dict], template: str | None = None) -> list[int]:
    """A chat prompt's token ids: the template renders the specials, nothing is added after."""
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# -- the shared server ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def server(model_dir, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("server_logs")
    template = log_dir / "override_template.jinja"
    template.write_text(OVERRIDE_TEMPLATE)
    args = ["--served-model-name", MODEL_NAME, MODEL_ALIAS,      # vllm style: several names after one flag
            "--api-key", API_KEY, "--api-key", API_KEY_2, "--chat-template", str(template),
            "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(MAX_NUM_SEQS),
            "--dtype", "float32", "--seed", "0",
            "--metrics-public"]   # with --api-key, /metrics needs the key unless this flag is given
    with ServerProcess(model_dir, args, log_dir) as proc:
        yield proc


@pytest.fixture(scope="session")
def base_url(server) -> str:
    return server.url


@pytest.fixture(scope="session")
def client(server):
    openai = pytest.importorskip("openai", reason="the server tests use the official openai client (dev extra)")

    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60.0)
    yield c
    c.close()


@pytest.fixture(scope="session")
def http(server):
    with httpx.Client(base_url=server.url, headers=auth(API_KEY), timeout=60.0) as c:
        yield c


def async_client(url: str, key: str = API_KEY, **kwargs):
    """An AsyncOpenAI client; create it inside the event loop that uses it."""
    openai = pytest.importorskip("openai", reason="the server tests use the official openai client (dev extra)")

    kwargs.setdefault("timeout", 60.0)
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, **kwargs)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# -- /metrics ------------------------------------------------------------------------------------

def read_metrics(url: str, key: str | None = None) -> dict[str, float]:
    """Prometheus text -> {sample name: value summed over label sets}; ``key``: for a server with
    --api-key and without --metrics-public."""
    from prometheus_client.parser import text_string_to_metric_families

    resp = httpx.get(f"{url}/metrics", headers=auth(key) if key else None, timeout=10.0)
    assert resp.status_code == 200, (resp.status_code, resp.text[:500])
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                values.setdefault(sample.name, 0.0)     # presence only: buckets don't add up
                continue
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


IDLE = {"lepton_requests_running": 0.0, "lepton_requests_waiting": 0.0, "lepton_kv_cache_usage": 0.0}


def wait_idle(url: str, timeout: float = 10.0) -> dict[str, float]:
    """Poll /metrics until nothing runs, nothing waits and no KV block is in use; the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        values = read_metrics(url)
        now = {name: values.get(name) for name in IDLE}
        if now == IDLE:
            return values
        if time.monotonic() > deadline:
            pytest.fail(f"server not idle {timeout:.0f} s later: {now}", pytrace=False)
        time.sleep(0.1)


# -- error bodies --------------------------------------------------------------------------------

LEAKS = ("Traceback", "/tmp", 'File "', "site-packages")


def assert_error(resp: httpx.Response, status: int, *, forbidden: tuple[str, ...] = ()) -> dict:
    """``resp`` has ``status`` and an OpenAI error body whose message leaks no path or traceback."""
    body_text = resp.text
    assert resp.status_code == status, f"expected {status}, got {resp.status_code}: {body_text[:500]}"
    try:
        body = resp.json()
    except json.JSONDecodeError:
        pytest.fail(f"{status} body is not JSON: {body_text[:500]!r}", pytrace=False)
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), f"no error object: {body}"
    err = body["error"]
    missing = {"message", "type", "param", "code"} - set(err)
    assert not missing, f"error object lacks {sorted(missing)}: {body}"
    assert isinstance(err["message"], str) and err["message"], body
    assert isinstance(err["type"], str) and err["type"], body
    for leak in LEAKS + tuple(forbidden):
        assert leak not in body_text, f"error body leaks {leak!r}: {body_text[:500]}"
    return err
