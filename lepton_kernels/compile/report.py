"""The compile report: run the cases for each target, one record per compiled kernel, and check.

A record is one (kernel, config, arch): ``op``, ``kernel``, ``arch`` ("sm_90"), ``config``
("<case label>/<dtype>"), ``registers``, ``spills`` (bytes stored + loaded), ``shared_bytes``,
``tensor_core_instructions`` (mma.sync / wgmma.mma_async lines of the PTX), and also ``case``,
``dtype``, ``ok``, ``error``, ``num_warps``, ``num_stages``, ``stack``, ``constexprs``, ``seconds``.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import time
import warnings

from .cases import CUDA_CORE_KERNELS, MATMUL_OPS, Case, cases
from .selftest import selftest_cases

TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def all_cases() -> list[Case]:
    return cases() + selftest_cases()


def select(names: list[str] | None = None, quick: bool = False) -> list[Case]:
    """The named cases (or op names), else the quick subset or every non-selftest case."""
    known = all_cases()
    if names:
        unknown = set(names) - {c.config for c in known} - {c.op for c in known}
        if unknown:
            raise ValueError(f"--case: unknown case(s) {sorted(unknown)}; "
                             f"known: {', '.join(c.config for c in known)}")
        return [c for c in known if c.config in names or c.op in names]
    return [c for c in cases() if c.quick or not quick]


def parse_arches(text: str) -> list[int]:
    """'sm_80,sm_90' (also '80,90', 'sm90') -> [80, 90]."""
    arches = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        digits = part.lower().removeprefix("sm").lstrip("_")
        if not digits.isdigit() or int(digits) < 70:
            raise ValueError(f"--arch: {part!r} is not a CUDA architecture like sm_80 or sm_90")
        arches.append(int(digits))
    if not arches:
        raise ValueError("--arch: give at least one architecture, e.g. sm_80,sm_90")
    return arches


def kernel_modules() -> list:
    """Every module of lepton_kernels.triton_kernels (so that new ones get the fake device too)."""
    import lepton_kernels.triton_kernels as pkg
    return [importlib.import_module(f"{pkg.__name__}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]


def prepare_environment() -> str | None:
    """Kernels must be compiled, not interpreted: TRITON_INTERPRET=0 before they are imported.
    Returns a problem when they were already imported under the interpreter."""
    # Triton 3.9 warns once per process about a future default; it says nothing about our kernels.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return None
    if any(name.startswith("lepton_kernels.triton_kernels.") for name in sys.modules):
        return ("the Triton kernels were imported with TRITON_INTERPRET=1; run the compile "
                "report in a fresh process with TRITON_INTERPRET=0")
    os.environ["TRITON_INTERPRET"] = "0"
    return None


def compile_case(arch: int, case: Case, dtypes: list[str], modules: list | None = None) -> list[dict]:
    """Records of one case on one target, for each of ``dtypes`` the case runs at."""
    import torch

    from .driver import Launch, compile_instead_of_launch, describe_error, fake_gpu, resource_usage

    modules = kernel_modules() if modules is None else modules
    records = []
    with fake_gpu(arch, modules):
        for dt in (d for d in dtypes if d in case.dtypes):
            launches: list[Launch] = []
            with compile_instead_of_launch(launches):
                try:
                    case.call(getattr(torch, TORCH_DTYPES[dt]))
                except Exception as err:   # the launcher itself failed
                    launches.append(Launch("<launcher>", describe_error(err), 0.0))
            seen = {launch.kernel for launch in launches}
            for name in case.expect:
                if name not in seen and "<launcher>" not in seen:
                    launches.append(Launch(name, f"the launcher never launched {name} (launched: "
                                           f"{sorted(seen)}): update the case in lepton_kernels/"
                                           f"compile/cases.py", 0.0))
            records += [_record(arch, case, dt, launch, resource_usage) for launch in launches]
    return records


def _record(arch: int, case: Case, dtype: str, launch, resource_usage) -> dict:
    rec = {"op": case.op, "kernel": launch.kernel, "arch": f"sm_{arch}",
           "config": f"{case.config}/{dtype}", "case": case.config, "dtype": dtype,
           "ok": launch.error is None, "error": launch.error, "registers": None, "spills": None,
           "shared_bytes": None, "tensor_core_instructions": None, "num_warps": None,
           "num_stages": None, "constexprs": {k: repr(v) for k, v in launch.constexprs.items()},
           "seconds": round(launch.seconds, 3)}
    if launch.compiled is not None:
        usage = resource_usage(launch.compiled, arch)
        compiled_for = usage.pop("arch_compiled")
        rec.update(usage)
        if compiled_for not in (None, arch):
            rec["ok"], rec["error"] = False, f"compiled for sm_{compiled_for}, not sm_{arch}"
    return rec


def _worker(arch: int, config: str, dtypes: list[str]) -> list[dict]:
    problem = prepare_environment()
    if problem:
        raise RuntimeError(problem)
    return compile_case(arch, next(c for c in all_cases() if c.config == config), dtypes)


def run(arches: list[int], dtypes: list[str], selected: list[Case], jobs: int = 1) -> dict:
    """{"error": str | None, "skip": str | None, "records": [...]} for every (arch, case, dtype)."""
    if problem := prepare_environment():
        return {"error": problem, "skip": None, "records": []}
    from .driver import api_problem, toolchain_problem

    if problem := toolchain_problem(arches):
        return {"error": None, "skip": problem, "records": []}
    if problem := api_problem():
        return {"error": problem, "skip": None, "records": []}
    work = [(arch, case) for arch in arches for case in selected]
    t0 = time.perf_counter()
    if jobs <= 1:
        modules = kernel_modules()
        records = [r for arch, case in work for r in compile_case(arch, case, dtypes, modules)]
    else:
        import concurrent.futures
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")   # a fresh interpreter: no inherited patches
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            futures = [pool.submit(_worker, arch, case.config, dtypes) for arch, case in work]
            records = [r for f in futures for r in f.result()]
    return {"error": None, "skip": None, "records": records,
            "seconds": round(time.perf_counter() - t0, 1)}


def problems(records: list[dict]) -> list[str]:
    """One message per offending record: compile error, spills, shared memory over the target's
    limit, or a matmul-class kernel at fp16/bf16 without tensor-core instructions."""
    from .driver import SHARED_LIMIT

    out = []
    for r in records:
        where = f"{r['op']} {r['config']} {r['kernel']} {r['arch']}"
        if not r["ok"]:
            kind = "launcher raised" if r["kernel"] == "<launcher>" else "compile error"
            if (r["error"] or "").startswith("the launcher never launched"):
                kind = "not compiled"
            out.append(f"{where}: {kind}: {error_summary(r['error'])}")
            continue
        if r.get("registers") is None:
            out.append(f"{where}: no cubin resource usage (did ptxas run?)")
        if r.get("spills"):
            out.append(f"{where}: spills {r['spills']} bytes to local memory "
                       f"({r['spill_stores']} stored, {r['spill_loads']} loaded)")
        limit = SHARED_LIMIT.get(int(r["arch"].removeprefix("sm_")))
        if limit and (r.get("shared_bytes") or 0) > limit:
            out.append(f"{where}: needs {r['shared_bytes']} bytes of shared memory, {r['arch']} "
                       f"allows {limit} per block (the launch would fail)")
        if (r["op"] in MATMUL_OPS and r["dtype"] in ("fp16", "bf16")
                and r["kernel"] not in CUDA_CORE_KERNELS and not r.get("tensor_core_instructions")):
            out.append(f"{where}: no tensor-core instructions (mma / wgmma) in a matmul-class kernel")
    return out


def table(records: list[dict]) -> str:
    """Readable fixed-width table of the records (errors shortened to their first line)."""
    head = ("op", "config", "kernel", "arch", "regs", "spills", "smem KiB", "mma", "warps", "stages", "status")
    rows = [head]
    for r in records:
        smem = "" if r.get("shared_bytes") is None else f"{r['shared_bytes'] / 1024:.1f}"
        status = "ok" if r["ok"] else "FAIL: " + error_summary(r["error"])[:120]
        if r["ok"] and r["kernel"] in CUDA_CORE_KERNELS and r["op"] in MATMUL_OPS:
            status = "ok (CUDA cores by design)"
        rows.append((r["op"], r["config"], r["kernel"], r["arch"], _s(r.get("registers")),
                     _s(r.get("spills")), smem, _s(r.get("tensor_core_instructions")),
                     _s(r.get("num_warps")), _s(r.get("num_stages")), status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 6)
    return "\n".join(line.rstrip() for line in lines) + "\n"


def error_summary(error: str | None) -> str:
    """One line: Triton's CompilationError puts the source excerpt first and the reason last."""
    lines = [line.strip() for line in (error or "failed").strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[-1]}"
    return lines[0] if lines else "failed"


def _s(value) -> str:
    return "" if value is None else str(value)
