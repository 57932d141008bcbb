"""Faults and cleanup of a tensor-parallel engine: a worker killed mid-generation (engine and
server), every way an engine ends (shutdown, with-block, garbage collection, interpreter exit,
a driver killed outright) leaving no process, and a rendezvous that times out saying what to
check. The autouse no_orphans fixture (conftest.py) checks this process's children after each."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import pytest

from lepton.engine.engine import Engine
from lepton.model_executor.parallel.executor import WorkerDiedError
from lepton.model_executor.parallel.state import RendezvousError, connect_store, wait_for_ranks
from lepton.sampling_params import SamplingParams
from tests.parallel.conftest import descendants
from tests.server.conftest import REPO, ServerProcess, free_port, read_metrics

LONG = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)


def workers_of(pid: int | None = None) -> list[int]:
    return [p for p, cmd in descendants(pid).items() if "spawn_main" in cmd]


def gone(pid: int) -> bool:
    """Exited (a zombie counts: it runs no more)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def wait_gone(pids, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not all(gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return all(gone(p) for p in pids)


def test_killed_worker_fails_the_engine_clearly(checkpoint):
    engine = Engine(checkpoint("llama"), device="cpu", max_model_len=128, tensor_parallel_size=2)
    try:
        [worker] = workers_of()
        stream = engine.stream("The quick brown fox", LONG)
        next(stream), next(stream)
        os.kill(worker, signal.SIGKILL)
        assert wait_gone([worker])
        with pytest.raises(WorkerDiedError, match=r"worker rank 1 \(pid \d+\) exited with code -9"):
            for _ in stream:
                pass
        with pytest.raises(WorkerDiedError, match="rank 1"):   # and every later call
            engine.generate(["again"], LONG, use_tqdm=False)
    finally:
        engine.shutdown()
        engine.shutdown()   # idempotent


def test_every_ending_leaves_no_process(checkpoint):
    path = checkpoint("gpt2")
    with Engine(path, device="cpu", max_model_len=64, tensor_parallel_size=2):
        [worker] = workers_of()
    assert wait_gone([worker])
    engine = Engine(path, device="cpu", max_model_len=64, tensor_parallel_size=2)
    [worker] = workers_of()
    del engine
    gc.collect()   # the executor's finalizer
    assert wait_gone([worker])


@pytest.mark.parametrize("ending", ["exit", "sigkill"])
def test_driver_process_ending_takes_its_workers(checkpoint, tmp_path, ending):
    """Interpreter exit runs the atexit hook; a driver killed outright runs nothing, and each
    worker's watchdog notices its parent is gone."""
    script = textwrap.dedent(f"""
        import sys, time
        from lepton.engine.engine import Engine
        engine = Engine({str(checkpoint("gpt2"))!r}, device="cpu", max_model_len=64, tensor_parallel_size=2)
        print("ready", flush=True)
        if {ending == "sigkill"!r}:
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        workers = workers_of(proc.pid)
        assert len(workers) == 1
        if ending == "sigkill":
            proc.kill()
        proc.wait(30)
        assert wait_gone(workers), f"workers left: {workers}"
    finally:
        proc.kill()
        proc.wait(30)


def test_server_health_503_and_json_500_after_a_worker_dies(checkpoint, tmp_path):
    args = ["--device", "cpu", "--max-model-len", "256", "--tensor-parallel-size", "2"]
    with ServerProcess(checkpoint("llama"), args, tmp_path) as server:
        [worker] = workers_of(server.proc.pid)
        result = {}

        def request():
            result["resp"] = httpx.post(f"{server.url}/v1/completions", timeout=60, json=dict(
                prompt="Hello", max_tokens=200, n=8, temperature=0, ignore_eos=True))

        thread = threading.Thread(target=request)
        thread.start()
        deadline = time.monotonic() + 30
        while read_metrics(server.url).get("lepton_requests_running", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(worker, signal.SIGKILL)
        thread.join(60)
        resp = result["resp"]
        assert resp.status_code == 500, resp.text
        assert "worker rank 1" in resp.json()["error"]["message"]
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 503
        server.stop()
        assert server.proc.returncode is not None


def test_rendezvous_timeout_says_what_to_check():
    port = free_port()   # nobody listens there
    started = time.monotonic()
    with pytest.raises(RendezvousError, match="MASTER_ADDR/MASTER_PORT.*firewall.*all 2 ranks were started"):
        connect_store("127.0.0.1", port, 1, 2, timeout_s=1.0)
    assert time.monotonic() - started < 30
    store = connect_store("127.0.0.1", 0, 0, 2, timeout_s=5.0)
    with pytest.raises(RendezvousError, match="only 1 of 2 ranks joined within 1 s; check"):
        wait_for_ranks(store, "lepton/test", 2, 1.0, where="check the other node")


@pytest.mark.parametrize("arch,kwargs,message", [
    ("llama", dict(tensor_parallel_size=3), "tensor_parallel_size=3 must divide num_attention_heads"),
    ("gpt2", dict(tensor_parallel_size=4), "tensor_parallel_size=4 must divide n_head"),
    ("bert", dict(tensor_parallel_size=2), "BertModel has no sharded layers"),
])
def test_an_unshardable_model_fails_before_any_process_starts(checkpoint, arch, kwargs, message):
    started = time.monotonic()
    with pytest.raises(ValueError, match=message):
        Engine(checkpoint(arch), device="cpu", **kwargs)
    assert time.monotonic() - started < 5 and not descendants()
