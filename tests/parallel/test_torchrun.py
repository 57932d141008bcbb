"""A two-node torchrun launch on loopback (2 nodes x 1 process, one command per node, as the
README gives it): rank 0 serves HTTP, rank 1 runs the worker loop; one greedy completion equals
the unsharded engine's, and SIGTERM to the launch ends every process of both nodes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from lepton.engine.engine import Engine
from lepton.sampling_params import SamplingParams
from tests.parallel.conftest import processes
from tests.parallel.test_tp_faults import gone
from tests.server.conftest import REPO, free_port

START_TIMEOUT = 180.0


def launch_processes(agents) -> set[int]:
    """The agents and every process under them (torchrun starts each rank in a session of its own,
    so the tree, not the session, finds them)."""
    found = {p.pid for p in agents}
    for _ in range(3):
        found |= {pid for pid, (ppid, _) in processes().items() if ppid in found}
    return found


def alive(pids) -> list[int]:
    return [pid for pid, (_, cmd) in processes().items() if pid in pids and not gone(pid)]


def launch(node: int, path, master_port: int, http_port: int, log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(master_port),
           "-m", "lepton", "serve", str(path), "--device", "cpu", "--max-model-len", "128",
           "--port", str(http_port)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", GLOO_SOCKET_IFNAME="lo")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def wait_healthy(url: str, procs, log_path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            pytest.fail(f"a node exited before serving:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"not healthy after {START_TIMEOUT} s:\n{log_path.read_text()[-4000:]}")


def test_two_node_torchrun_serves_a_request(checkpoint, tmp_path):
    path = checkpoint("llama")
    with Engine(path, device="cpu", max_model_len=128) as engine:
        expected = engine.generate(["The quick brown fox"], SamplingParams(temperature=0, max_tokens=8,
                                                                           ignore_eos=True), use_tqdm=False)
    master_port, http_port = free_port(), free_port()
    logs = [open(tmp_path / f"node{n}.log", "w") for n in (0, 1)]
    procs = [launch(n, path, master_port, http_port, logs[n]) for n in (0, 1)]
    launched = {p.pid for p in procs}
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_healthy(url, procs, tmp_path / "node0.log")
        launched = launch_processes(procs)
        assert len(launched) == 4   # two agents, two ranks
        resp = httpx.post(f"{url}/v1/completions", timeout=60, json=dict(
            prompt="The quick brown fox", max_tokens=8, temperature=0, ignore_eos=True))
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["text"] == expected[0].outputs[0].text
        procs[0].send_signal(signal.SIGTERM)   # the launch of node 0; node 1 follows its rank 0
        for p in procs:
            p.wait(60)
        assert procs[1].returncode == 0, (tmp_path / "node1.log").read_text()[-4000:]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(30)
        for log in logs:
            log.close()
    deadline = time.monotonic() + 15
    while alive(launched) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = alive(launched)
    for pid in left:   # never leave anything running, even when the check below fails
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left by the launch: {left}"
