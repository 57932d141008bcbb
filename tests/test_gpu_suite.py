"""The GPU suite's plumbing, on CPU: --help, the no-GPU exit, and a smoke run at 1/16 scale that
must produce a row for every case of every op with no errors, so a GPU lease is never spent on a
crash of the script itself."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lepton_kernels

SUITE = Path(__file__).parents[1] / "benchmarks" / "gpu_suite.py"


def run(*args):
    return subprocess.run([sys.executable, str(SUITE), *args], capture_output=True, text=True, timeout=300)


def test_help_works_without_a_gpu():
    proc = run("--help")
    assert proc.returncode == 0 and "--smoke" in proc.stdout and "--out" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when there is no GPU")
def test_without_a_gpu_it_says_so_and_exits_cleanly(tmp_path):
    proc = run("--out", str(tmp_path))
    assert proc.returncode == 0 and "no CUDA device" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())


def test_smoke_run_covers_every_op(tmp_path):
    proc = run("--smoke", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    rows = report["rows"]
    assert not [r for r in rows if "error" in r]
    expected = set(lepton_kernels.list_ops()) - {"quantize", "dequantize"}  # offline weight prep
    assert {r["op"] for r in rows} == expected
    cases = [(r["op"], r["case"], r["impl"]) for r in rows]
    assert len(cases) == len(set(cases)), "a case is measured twice"
    # Every implementation the smoke run can time agrees with eager on fresh random inputs.
    assert all(r["rel_err"] < 1e-5 for r in rows if "rel_err" in r)
    assert any(r["impl"] == "ext" for r in rows) == lepton_kernels.ext_info()["built"]
    assert (tmp_path / "gpu_suite.md").read_text().startswith("# GPU suite on cpu (smoke)")
