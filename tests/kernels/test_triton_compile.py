"""Every Triton kernel compiles for real GPUs (sm_80 A100, sm_90 H100/H200), on a machine without one.

The interpreter tests (TRITON_INTERPRET=1) accept programs the real compiler rejects (constexpr
rules, dtype promotion, tl.dot shapes/dtypes, block shape mismatches), so here each launcher runs
in a subprocess with TRITON_INTERPRET=0 against a fake driver for the target, and every launch is
compiled to a cubin with Triton's bundled ptxas instead of run; see tests/kernels/triton_aot.py
(also a CLI: ``python -m tests.kernels.triton_aot --full --table --spills``).

Default run: a representative subset (every kernel and launch path, Llama-3-8B-like shapes) for
fp16 / bf16 on both targets; fp32 and the remaining variants are marked slow. Skipped only when this
triton install cannot compile for CUDA at all (no nvidia backend, no ptxas).
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernels import triton_aot

ROOT = Path(__file__).resolve().parents[2]
ARCHES = (80, 90)
DTYPES = ("fp16", "bf16", "fp32")
DEFAULT_DTYPES = ("fp16", "bf16")   # fp32 (no tensor-core path in production) only in the slow run
CASES = triton_aot.cases()


def _toolchain_skip():
    problem = triton_aot.cuda_toolchain_problem()
    if problem:
        pytest.skip(f"this triton install cannot compile for CUDA: {problem}")


def _compile(arch: int, case_args: tuple[str, ...]) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="0")
    env.pop("LEPTON_KERNELS", None)
    cmd = [sys.executable, "-m", "tests.kernels.triton_aot", "--arch", str(arch), *case_args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    try:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        pytest.fail(f"compile subprocess for sm_{arch} gave no result (exit {proc.returncode}):\n"
                    f"{proc.stderr[-4000:]}")
    if out.get("skip"):
        pytest.skip(f"this triton install cannot compile for CUDA: {out['skip']}")
    if out.get("error"):
        pytest.fail(f"compile harness for sm_{arch} failed: {out['error']}")
    return out


@functools.lru_cache(maxsize=None)
def _results(case_args: tuple[str, ...]) -> dict:
    """{(case, arch, dtype): [kernel rows]} for one subprocess per arch, run in parallel."""
    with concurrent.futures.ThreadPoolExecutor(len(ARCHES)) as pool:
        outs = list(pool.map(lambda arch: _compile(arch, case_args), ARCHES))
    table: dict = {}
    for out in outs:
        for row in out["results"]:
            table.setdefault((row["case"], row["arch"], row["dtype"]), []).append(row)
    return table


def _default_results():
    return _results(tuple(a for dt in DEFAULT_DTYPES for a in ("--dtype", dt)))


def _slow_results():
    # everything; the default subset comes from triton's on-disk cache when it ran first
    return _results(("--full",))


def _summary(rows) -> str:
    return "; ".join(f"{r['kernel']}: regs={r.get('regs')} shared={r.get('shared')} "
                     f"stack={r.get('stack')} warps={r.get('num_warps')} stages={r.get('num_stages')}"
                     for r in rows)


def _params(default: bool):
    marks = [] if default else [pytest.mark.slow]
    return [pytest.param(c.name, arch, dt, marks=marks, id=f"{c.name}-sm{arch}-{dt}")
            for c in CASES for arch in ARCHES for dt in DTYPES
            if dt in c.dtypes and (c.default and dt in DEFAULT_DTYPES) == default]


def _check(results: dict, case: str, arch: int, dtype: str):
    rows = results.get((case, arch, dtype))
    assert rows, f"{case} sm_{arch} {dtype}: no kernel was compiled"
    failed = [r for r in rows if not r["ok"]]
    assert not failed, "\n\n".join(
        f"{case} sm_{arch} {dtype}: {r['kernel']} does not compile:\n{r['error']}" for r in failed)
    for r in rows:  # a compile that produced a real binary for this target
        assert r.get("regs"), f"{case} sm_{arch} {dtype}: {r['kernel']}: no cubin resource usage"
    print(f"{case} sm_{arch} {dtype}: {_summary(rows)}")


@pytest.mark.parametrize("case,arch,dtype", _params(default=True))
def test_compiles(case, arch, dtype):
    _toolchain_skip()
    _check(_default_results(), case, arch, dtype)


@pytest.mark.parametrize("case,arch,dtype", _params(default=False))
def test_compiles_all_variants(case, arch, dtype):
    _toolchain_skip()
    _check(_slow_results(), case, arch, dtype)


def test_every_kernel_is_covered_by_default():
    """Each @triton.jit kernel of lepton_kernels.triton_kernels is reached by a default case."""
    import ast
    kernels = set()
    for name in triton_aot.KERNEL_MODULES:
        tree = ast.parse((ROOT / "lepton_kernels" / "triton_kernels" / f"{name}.py").read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and any(
                    "jit" in ast.unparse(d) for d in node.decorator_list) and "_kernel" in node.name:
                kernels.add(node.name)
    modules = {p.stem for p in (ROOT / "lepton_kernels" / "triton_kernels").glob("*.py")}
    assert modules - {"__init__"} == set(triton_aot.KERNEL_MODULES)
    covered = {k for c in CASES if c.default for k in c.expect}
    assert kernels <= covered, f"kernels no default compile case reaches: {sorted(kernels - covered)}"


def test_compile_errors_are_caught():
    """The harness reports the compiler's error for a kernel the interpreter would accept."""
    _toolchain_skip()
    out = _compile(90, ("--case", triton_aot.SELFTEST, "--dtype", "fp16"))
    rows = out["results"]
    assert [r["kernel"] for r in rows] == ["_selftest_bad_dot_kernel"], rows
    assert not rows[0]["ok"] and rows[0]["error"], rows
