"""Tensor-parallel tests on CPU with gloo: tiny checkpoints (tests/models/conftest.py), and a
check after every test that no process it started is left (workers, servers, torchrun agents).

Python's multiprocessing resource tracker (one per process that ever spawned, gone when the
process exits) is the only child allowed to stay.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.models.conftest import checkpoint_factory


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process (from /proc)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError, IndexError):
            continue
        table[int(entry)] = (ppid, cmd)
    return table


def descendants(pid: int | None = None) -> dict[int, str]:
    """Live descendants of ``pid`` (default: this process), the resource tracker excepted."""
    table, pid = processes(), pid or os.getpid()
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, cmd) in table.items():
            if ppid == parent and child not in found:
                found[child] = cmd
                frontier.append(child)
    return {p: c for p, c in found.items() if "resource_tracker" not in c and c}


def wait_no_descendants(timeout: float = 15.0) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    while (left := descendants()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture(autouse=True)
def no_orphans():
    """After each test: every process the test started has ended."""
    yield
    left = wait_no_descendants()
    assert not left, f"processes left behind: {left}"


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(arch, **config_overrides) -> folder, built once per session."""
    return checkpoint_factory(tmp_path_factory.mktemp("tp_checkpoints"))
