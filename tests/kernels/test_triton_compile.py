"""The compile report: every Triton kernel compiles for real GPUs (sm_80 A100, sm_90 H100/H200)
on a machine without one, with no spills and with tensor cores where the op is a matmul.

The interpreter tests (TRITON_INTERPRET=1) accept programs the real compiler rejects (constexpr
rules, dtype promotion, tl.dot shapes/dtypes) and say nothing about registers, so here
``lepton kernels --compile --check`` runs in a subprocess with TRITON_INTERPRET=0 (see
lepton_kernels/compile). Default run: the quick cases (each kernel's main launch paths) for
fp16 / bf16 on both targets; the exhaustive run (every case, fp32 too) is marked slow. Skipped
only when this triton install cannot compile for CUDA at all (no nvidia backend, no ptxas).
"""

from __future__ import annotations

import ast
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lepton_kernels.compile import cases as case_list
from lepton_kernels.compile import driver, report

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = {"op": str, "kernel": str, "arch": str, "config": str, "registers": int, "spills": int,
          "shared_bytes": int, "tensor_core_instructions": int}


def _toolchain_skip():
    if problem := driver.toolchain_problem():
        pytest.skip(f"this triton install cannot compile for CUDA: {problem}")


def _lepton(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="0")
    env.pop("LEPTON_KERNELS", None)
    return subprocess.run([sys.executable, "-m", "lepton", "kernels", "--compile", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


@functools.lru_cache(maxsize=None)
def _report(*args: str) -> tuple[int, list[dict], str]:
    proc = _lepton("--arch", "sm_80,sm_90", "--json", "--check", "--jobs", "2", *args)
    try:
        records = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"the compile report printed no JSON (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.returncode, records, proc.stderr


def _assert_clean(args: tuple[str, ...], cases: list, dtypes: tuple[str, ...]):
    code, records, stderr = _report(*args)
    checks = [line for line in stderr.splitlines() if "check failed" in line]
    assert code == 0 and not checks, "\n".join(checks) or stderr[-4000:]
    done = {(r["case"], r["arch"], r["dtype"]) for r in records}
    wanted = {(c.config, f"sm_{a}", d) for c in cases for a in (80, 90) for d in dtypes if d in c.dtypes}
    assert wanted <= done, f"cases without a record: {sorted(wanted - done)[:10]}"
    for r in records:  # a real binary for the target, with the report's numbers
        assert r["ok"] and r["registers"] and r["spills"] == 0, r


def test_quick_cases_compile_without_spills_for_sm80_and_sm90():
    _toolchain_skip()
    quick = [c for c in case_list.cases() if c.quick]
    _assert_clean(("--quick", "--dtype", "fp16,bf16"), quick, ("fp16", "bf16"))


@pytest.mark.slow
def test_every_case_compiles_at_every_dtype():
    _toolchain_skip()
    _assert_clean((), case_list.cases(), ("fp16", "bf16", "fp32"))


def test_records_have_the_documented_schema():
    _toolchain_skip()
    _, records, _ = _report("--quick", "--dtype", "fp16,bf16")
    assert records
    for r in records:
        for key, kind in SCHEMA.items():   # numbers are None only where nothing was compiled
            assert isinstance(r[key], kind) or (r[key] is None and not r["ok"]), (key, r)
        assert r["arch"] in ("sm_80", "sm_90") and r["config"] == f"{r['case']}/{r['dtype']}"
    keys = [(r["kernel"], r["config"], r["arch"]) for r in records]
    assert len(keys) == len(set(keys)), "one record per (kernel, config, arch)"
    # sm_90 attention uses Hopper's warpgroup MMA at fp16, sm_80 the mma.sync of Ampere
    flash = {r["arch"]: r["tensor_core_instructions"] for r in records
             if r["config"] == "flash_prefill_causal_d128/fp16"}
    assert flash["sm_80"] > 0 and flash["sm_90"] > 0


def test_every_kernel_is_reached_by_a_quick_case():
    """Each @triton.jit *_kernel of lepton_kernels.triton_kernels is expected by a quick case."""
    kernels = set()
    for path in (ROOT / "lepton_kernels" / "triton_kernels").glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if (isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel")
                    and any("jit" in ast.unparse(d) for d in node.decorator_list)):
                kernels.add(node.name)
    covered = {k for c in case_list.cases() if c.quick for k in c.expect}
    assert kernels <= covered, f"kernels no quick compile case reaches: {sorted(kernels - covered)}"


def test_check_fails_on_a_compile_error_and_on_spills():
    """Deliberately bad kernels: tl.dot on 8x8 tiles (rejected by the compiler, accepted by the
    interpreter) and 256 live fp32 values per thread (ptxas spills)."""
    _toolchain_skip()
    proc = _lepton("--arch", "sm_90", "--case", "selftest_bad_dot", "--case", "selftest_spill",
                   "--check", "--jobs", "1")
    assert proc.returncode == 1, proc.stderr[-3000:]
    failed = [line for line in proc.stderr.splitlines() if "check failed" in line]
    assert len(failed) == 2, proc.stderr[-3000:]
    assert "_selftest_bad_dot_kernel sm_90: compile error" in failed[0] and "K >= 16" in failed[0]
    assert "_selftest_spill_kernel sm_90: spills" in failed[1]
    table = proc.stdout.splitlines()
    assert table[0].split()[:4] == ["op", "config", "kernel", "arch"]
    assert any("selftest_bad_dot/fp16" in line and "FAIL" in line for line in table)


def _fake(**overrides) -> dict:
    rec = {"op": "flash_attention", "kernel": "_k", "arch": "sm_90", "config": "c/fp16", "case": "c",
           "dtype": "fp16", "ok": True, "error": None, "registers": 128, "spills": 0,
           "spill_stores": 0, "spill_loads": 0, "shared_bytes": 65536, "tensor_core_instructions": 8,
           "num_warps": 4, "num_stages": 2}
    return {**rec, **overrides}


def test_check_rules_on_fake_records():
    assert report.problems([_fake(), _fake(dtype="fp32", tensor_core_instructions=0),
                            _fake(op="rms_norm", tensor_core_instructions=0),
                            _fake(kernel="_merge_splits_kernel", tensor_core_instructions=0)]) == []
    bad = report.problems([
        _fake(tensor_core_instructions=0),
        _fake(op="quant_matmul", dtype="bf16", tensor_core_instructions=0),
        _fake(spills=24, spill_stores=8, spill_loads=16),
        _fake(arch="sm_80", shared_bytes=200 * 1024),
        _fake(ok=False, error="CompilationError: at 1:2:\nsource\n^\nK >= 16", registers=None),
    ])
    assert len(bad) == 5, bad
    assert "no tensor-core instructions" in bad[0] and "no tensor-core instructions" in bad[1]
    assert "spills 24 bytes" in bad[2] and "shared memory" in bad[3] and "K >= 16" in bad[4]


def test_tensor_core_count_skips_fences_and_commits():
    ptx = """
        wgmma.fence.sync.aligned;
        wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%r1}, %rd1, %rd2, 1, 1, 1, 0, 0;
        wgmma.commit_group.sync.aligned;
        wgmma.wait_group.sync.aligned 0;
        mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%f1}, {%r1}, {%r2}, {%f2};
        @%p1 mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};
        // mma.sync in a comment
        fma.rn.f32 %f1, %f2, %f3, %f4;
    """
    assert driver.tensor_core_instructions(ptx) == 3


def test_table_has_a_row_per_record():
    text = report.table([_fake(), _fake(kernel="_merge_splits_kernel", op="paged_attention",
                                        tensor_core_instructions=0),
                         _fake(ok=False, error="CompilationError: at 1:2:\nx\nK >= 16", registers=None)])
    lines = text.splitlines()
    assert lines[0].split() == ["op", "config", "kernel", "arch", "regs", "spills", "smem", "KiB",
                                "mma", "warps", "stages", "status"]
    assert len(lines) == 5 and "64.0" in lines[2] and "CUDA cores by design" in lines[3]
    assert lines[4].endswith("FAIL: CompilationError: at 1:2: K >= 16")


def test_old_entry_point_keeps_its_flags_and_json():
    _toolchain_skip()
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.triton_aot", "--arch", "90", "--dtype",
                           "fp16", "--case", "selftest_bad_dot", "--spills"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["error"] is None and [r["kernel"] for r in out["results"]] == ["_selftest_bad_dot_kernel"]
    row = out["results"][0]
    assert row["arch"] == 90 and row["case"] == "selftest_bad_dot" and not row["ok"] and row["error"]
