"""The GPU suite's plumbing, on CPU: --help, the no-GPU exit, and a smoke run at 1/16 scale that
must produce a row for every case of every op with no errors, so a GPU lease is never spent on a
crash of the script itself; its baselines compute what the op computes, and its goal lines and
datasheet peaks are right."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lepton_kernels

BENCH = Path(__file__).parents[1] / "benchmarks"
SUITE = BENCH / "gpu_suite.py"
sys.path.insert(0, str(BENCH))
import gpu_suite  # noqa: E402


def run(*args):
    return subprocess.run([sys.executable, str(SUITE), *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    proc = run("--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((out / "gpu_suite.json").read_text()), (out / "gpu_suite.md").read_text()


def test_help_works_without_a_gpu():
    proc = run("--help")
    assert proc.returncode == 0 and "--smoke" in proc.stdout and "--out" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when there is no GPU")
def test_without_a_gpu_it_says_so_and_exits_cleanly(tmp_path):
    proc = run("--out", str(tmp_path))
    assert proc.returncode == 0 and "no CUDA device" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())


def test_smoke_run_covers_every_op(smoke):
    report, md = smoke
    rows = report["rows"]
    assert not [r for r in rows if "error" in r]
    expected = set(lepton_kernels.list_ops()) - {"quantize", "dequantize"}  # offline weight prep
    assert {r["op"] for r in rows} == expected
    cases = [(r["op"], r["case"], r["impl"]) for r in rows]
    assert len(cases) == len(set(cases)), "a case is measured twice"
    # Every implementation the smoke run can time agrees with eager on fresh random inputs.
    assert all(r["rel_err"] < 1e-5 for r in rows if "rel_err" in r)
    assert any(r["impl"] == "ext" for r in rows) == lepton_kernels.ext_info()["built"]
    assert md.startswith("# GPU suite on cpu (smoke)") and report["note"] == ""


def test_smoke_run_has_the_issue_baselines_and_shapes(smoke):
    rows = smoke[0]["rows"]
    base = {(r["op"], r["case"]): r for r in rows if r["impl"].startswith("baseline")}
    # Each baseline was checked against eager: it computes what the op computes.
    assert all(r["rel_err"] < 1e-5 for r in base.values()), base
    prefill = [c for op, c in base if op == "flash_attention"]
    assert "prefill_B1_L256_causal" in prefill   # 4096 tokens / 16
    assert all("SDPA flash (enable_gqa" in base[op, c]["impl"] for op, c in base if "attention" in op)
    decode = [c for op, c in base if op == "paged_attention"]
    # 32k tokens of context per batch (/16 in the smoke run), split over 1..64 sequences
    assert sorted(int(c.split("_B")[1].split("_")[0]) * int(c.split("ctx")[1]) for c in decode) == [2048] * 4
    quant = {c.split("_N")[0] for op, c in base if op == "quant_matmul"}
    assert quant == {f"W{b}A16_g{g}_M{m}" for b, g in ((4, 128), (8, None)) for m in (1, 4, 16, 64, 256)}
    assert all("F.linear" in base[op, c]["impl"] for op, c in base if op == "quant_matmul")


def test_no_baseline_repeats_kv_heads():
    # SDPA gets enable_gqa=True; repeating K/V heads would charge the baseline for a copy.
    assert "repeat_interleave" not in (BENCH / "gpu_cases.py").read_text()


def test_datasheet_peaks_by_device_name():
    assert gpu_suite.peaks_for("NVIDIA H200") == {"bf16_TFLOPs": 989.0, "HBM_GBps": 4800.0}
    assert gpu_suite.peaks_for("NVIDIA H100 80GB HBM3") == {"bf16_TFLOPs": 989.0, "HBM_GBps": 3350.0}
    assert gpu_suite.peaks_for("NVIDIA H100 PCIe")["HBM_GBps"] == 2000.0
    assert gpu_suite.peaks_for("cpu (smoke)") == {}


def test_goal_lines_put_targets_beside_measured_worst():
    rows = [
        {"op": "flash_attention", "case": "prefill_B1_L4096_causal", "impl": "triton", "ms": 1, "speedup": 1.2},
        {"op": "paged_attention", "case": "decode_B1_ctx32768", "impl": "triton", "ms": 1, "pct_peak": 85.0},
        {"op": "paged_attention", "case": "decode_B64_ctx512", "impl": "triton", "ms": 1, "pct_peak": 61.5},
        {"op": "quant_matmul", "case": "W4A16_g128_M16_N6144_K4096", "impl": "triton", "ms": 1, "speedup": 3.4},
        {"op": "quant_matmul", "case": "W4A16_g128_M64_N6144_K4096", "impl": "triton", "ms": 1, "speedup": 0.9},
    ]
    lines = gpu_suite.goals(rows)
    assert lines[0].endswith("measured worst 1.20x (prefill_B1_L4096_causal) -> met")
    assert lines[1].endswith("measured worst 61.50% (decode_B64_ctx512) -> MISSED")
    assert "target >= 3x" in lines[2] and lines[2].endswith("3.40x (W4A16_g128_M16_N6144_K4096) -> met")
    assert lines[3].endswith("no triton/ext measurement of speedup")
