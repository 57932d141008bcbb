"""Ahead-of-time compile of every lepton Triton kernel for real NVIDIA targets, without a GPU.

Run as ``python -m tests.kernels.triton_aot --arch 90 --dtype fp16`` (tests/kernels/
test_triton_compile.py does so in a subprocess): TRITON_INTERPRET must be 0 before the kernel
modules are imported, while the main test process runs with the interpreter on.

How: a fake Triton driver reports the target GPUTarget("cuda", arch, 32); each *launcher* (the
same function the op registry calls) runs on small CPU tensors of representative shapes, and
JITFunction.run is intercepted so every launch compiles (``warmup=True``) instead of running.
The signature, specialization and constexprs are therefore exactly what the launcher passes.
Launch heuristics that ask the device (compute capability, SM count, ``device.type == "cuda"``)
are answered as the target GPU would: torch.cuda's queries are patched, and every launcher helper
that takes a ``device`` parameter receives ``cuda:0`` instead of ``cpu``.

Prints one JSON object: {"error": null | str, "results": [{case, arch, dtype, kernel, ok, error,
seconds, regs, shared, stack, spill_stores, spill_loads, num_warps, num_stages}, ...]}.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import inspect
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from typing import Callable

KERNEL_MODULES = ("rms_norm", "layer_norm", "rotary_embedding", "activation", "flash_attention",
                  "paged_attention", "reshape_and_cache", "quant_matmul")
SM_COUNT = {80: 108, 90: 132}            # A100, H100/H200
DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


# ----------------------------------------------------------------------------------------------
# Can this triton install compile for CUDA at all?
# ----------------------------------------------------------------------------------------------

def cuda_toolchain_problem() -> str | None:
    """None when triton can compile CUDA kernels to cubin here, else why not (-> skip)."""
    try:
        import triton
        from triton.backends import backends
    except Exception as err:
        return f"triton cannot be imported: {err!r}"
    if "nvidia" not in backends:
        return f"triton has no nvidia backend (backends: {sorted(backends)})"
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        for arch in (80, 90):
            path = get_ptxas(arch).path
            if not (path and os.access(path, os.X_OK)):
                return f"ptxas for sm_{arch} is missing: {path!r}"
    except Exception as err:
        return f"triton's ptxas cannot be located: {err!r}"
    return None


def api_problem() -> str | None:
    """None when the triton API this harness drives is there, else what differs (-> fail)."""
    import triton
    from triton.runtime import jit as jit_mod
    from triton.runtime.driver import driver
    from triton.backends.compiler import GPUTarget  # noqa: F401
    run = getattr(jit_mod.JITFunction, "run", None)
    params = inspect.signature(run).parameters if run else {}
    if not {"grid", "warmup"} <= set(params):
        return (f"triton {triton.__version__}: JITFunction.run(*args, grid, warmup, **kwargs) "
                f"expected, found {list(params)}")
    if not hasattr(driver, "set_active"):
        return f"triton {triton.__version__}: triton.runtime.driver.driver.set_active is missing"
    return None


# ----------------------------------------------------------------------------------------------
# Pretending to be a GPU
# ----------------------------------------------------------------------------------------------

class FakeCudaDriver:
    """Just what JITFunction.run(warmup=True) asks the active driver for."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.arch, self.target = arch, GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return self.arch             # also the key of the per-device kernel caches

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        import torch
        return torch.device("cuda", 0)


def _device_helpers(module) -> list[tuple[str, Callable]]:
    """Plain functions of a kernel module that take a ``device`` argument."""
    out = []
    for name, fn in vars(module).items():
        if not callable(fn) or getattr(fn, "__module__", None) != module.__name__:
            continue
        target = getattr(fn, "__wrapped__", fn)
        if not inspect.isfunction(target):
            continue   # JITFunctions, classes
        if "device" in inspect.signature(target).parameters:
            out.append((name, fn))
    return out


@contextlib.contextmanager
def fake_gpu(arch: int, modules: list):
    import torch
    from triton.runtime.driver import driver

    cap = divmod(arch, 10)
    props = types.SimpleNamespace(name=f"fake sm_{arch}", major=cap[0], minor=cap[1],
                                  multi_processor_count=SM_COUNT.get(arch, 108),
                                  total_memory=80 << 30)
    cuda_dev = torch.device("cuda", 0)

    def as_cuda(fn):
        sig = inspect.signature(getattr(fn, "__wrapped__", fn))

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            dev = bound.arguments.get("device")
            if isinstance(dev, torch.device) and dev.type == "cpu":
                bound.arguments["device"] = cuda_dev
            return fn(*bound.args, **bound.kwargs)
        return wrapper

    def clear_caches():
        for m in modules:
            for fn in vars(m).values():
                if hasattr(fn, "cache_clear") and getattr(fn, "__module__", None) == m.__name__:
                    fn.cache_clear()

    saved_cuda = {n: getattr(torch.cuda, n) for n in
                  ("get_device_capability", "get_device_properties", "current_device")}
    torch.cuda.get_device_capability = lambda device=None: cap
    torch.cuda.get_device_properties = lambda device=None: props
    torch.cuda.current_device = lambda: 0
    saved_helpers = [(m, name, fn) for m in modules for name, fn in _device_helpers(m)]
    for m, name, fn in saved_helpers:
        setattr(m, name, as_cuda(fn))
    clear_caches()
    previous = getattr(driver, "_active", None)   # None until a real driver was asked for
    driver.set_active(FakeCudaDriver(arch))
    try:
        yield
    finally:
        driver._active = previous
        for m, name, fn in saved_helpers:
            setattr(m, name, fn)
        for n, fn in saved_cuda.items():
            setattr(torch.cuda, n, fn)
        clear_caches()


@dataclass
class Launch:
    kernel: str
    ok: bool
    error: str | None
    seconds: float
    compiled: object = None
    constexprs: dict = field(default_factory=dict)


@contextlib.contextmanager
def compile_instead_of_launch(launches: list):
    """Every kernel[grid](...) compiles (warmup) and records, and never runs; a compile error
    is recorded and swallowed so the launcher goes on to its next kernel."""
    from triton.runtime.jit import JITFunction
    orig = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        t0 = time.perf_counter()
        consts = {k: v for k, v in kwargs.items() if not hasattr(v, "data_ptr")}
        try:
            kernel = orig(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as err:  # the compiler's error, reported per kernel
            launches.append(Launch(self.fn.__name__, False, _describe(err),
                                   time.perf_counter() - t0, None, consts))
            return None
        launches.append(Launch(self.fn.__name__, True, None, time.perf_counter() - t0,
                               kernel, consts))
        return kernel

    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = orig


def _describe(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    if len(text) > 6000:
        text = text[:3000] + "\n...\n" + text[-3000:]
    return text


# ----------------------------------------------------------------------------------------------
# Resource usage of a compiled kernel
# ----------------------------------------------------------------------------------------------

def resource_usage(kernel, arch: int, spills: bool) -> dict:
    """regs / static shared / stack from cuobjdump on the cubin; Triton's dynamic shared memory
    from the metadata; spill bytes from ``ptxas -v`` on the PTX when ``spills``."""
    meta = kernel.metadata
    info = {"shared": getattr(meta, "shared", None), "num_warps": getattr(meta, "num_warps", None),
            "num_stages": getattr(meta, "num_stages", None), "arch_compiled": None,
            "regs": None, "stack": None, "spill_stores": None, "spill_loads": None}
    target = getattr(meta, "target", None)
    info["arch_compiled"] = getattr(target, "arch", None)
    cubin = kernel.asm.get("cubin")
    if not cubin:
        return info
    from triton import knobs
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        try:
            out = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", path],
                                 capture_output=True, text=True, timeout=60).stdout
            if m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out):
                info["regs"], info["stack"] = int(m[1]), int(m[2])
                info["static_shared"], info["local"] = int(m[3]), int(m[4])
        except Exception as err:
            info["cuobjdump_error"] = repr(err)
        if spills and kernel.asm.get("ptx"):
            from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
            ptx = os.path.join(tmp, "k.ptx")
            with open(ptx, "w") as f:
                f.write(kernel.asm["ptx"])
            log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}",
                                  ptx, "-o", os.path.join(tmp, "k.o")],
                                 capture_output=True, text=True, timeout=300).stderr
            if m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log):
                info["spill_stores"], info["spill_loads"] = int(m[1]), int(m[2])
    return info


# ----------------------------------------------------------------------------------------------
# Cases: launcher calls at Llama-3-8B-like shapes (hidden 4096, 32 q / 8 kv heads, D 128 or 80)
# ----------------------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    call: Callable           # call(dtype) runs the launcher once on CPU tensors
    expect: tuple[str, ...]  # kernels this launch must reach
    dtypes: tuple[str, ...] = ("fp16", "bf16", "fp32")
    default: bool = False    # in the default (fast) run


def _tk(name):
    return importlib.import_module(f"lepton_kernels.triton_kernels.{name}")


def _randn(*shape, dtype):
    import torch
    g = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=g).to(dtype)


def _norm_case(residual: bool, layer: bool):
    def call(dtype):
        x, r = _randn(7, 4096, dtype=dtype), _randn(7, 4096, dtype=dtype)
        w, b = _randn(4096, dtype=dtype), _randn(4096, dtype=dtype)
        res = r if residual else None
        if layer:
            _tk("layer_norm").layer_norm(x, w, b if residual else None, 1e-5, res)
        else:
            _tk("rms_norm").rms_norm(x, w, 1e-6, res)
    return call


def _rotary_case(head_dim: int, rot_dim: int, is_neox: bool):
    def call(dtype):
        import torch
        q, k = _randn(7, 32, head_dim, dtype=dtype), _randn(7, 8, head_dim, dtype=dtype)
        cache = _randn(64, rot_dim, dtype=dtype)
        pos = torch.arange(7, dtype=torch.int64)
        _tk("rotary_embedding").rotary_embedding(pos, q, k, cache, is_neox)
    return call


def _act_case(kind: str):
    def call(dtype):
        x = _randn(7, 2 * 14336, dtype=dtype)
        mod = _tk("activation")
        if kind == "silu":
            mod.silu_and_mul(x)
        else:
            mod.gelu_and_mul(x, approximate=kind)
    return call


def _flash_case(head_dim: int, q_len: int, causal: bool, window: int | None = None):
    def call(dtype):
        import torch
        lens_q, lens_k = [q_len, max(1, q_len // 2)], [q_len + 16, max(1, q_len // 2)]
        q = _randn(sum(lens_q), 32, head_dim, dtype=dtype)
        k = _randn(sum(lens_k), 8, head_dim, dtype=dtype)
        v = _randn(sum(lens_k), 8, head_dim, dtype=dtype)
        cu_q = torch.tensor([0, lens_q[0], sum(lens_q)], dtype=torch.int32)
        cu_k = torch.tensor([0, lens_k[0], sum(lens_k)], dtype=torch.int32)
        _tk("flash_attention").flash_attention(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                               causal, None, window)
    return call


def _paged_case(head_dim: int, batch: int, q_len: int, seq_len: int, window: int | None = None):
    def call(dtype):
        import torch
        bs = 16
        blocks_per_seq = math.ceil(seq_len / bs)
        kc = _randn(batch * blocks_per_seq, bs, 8, head_dim, dtype=dtype)
        vc = _randn(batch * blocks_per_seq, bs, 8, head_dim, dtype=dtype)
        table = torch.arange(batch * blocks_per_seq, dtype=torch.int32).view(batch, blocks_per_seq)
        seq_lens = torch.full((batch,), seq_len, dtype=torch.int32)
        cu_q = torch.arange(batch + 1, dtype=torch.int32) * q_len
        q = _randn(batch * q_len, 32, head_dim, dtype=dtype)
        _tk("paged_attention").paged_attention(q, kc, vc, table, seq_lens, cu_q, q_len, seq_len,
                                               None, window)
    return call


def _cache_case(head_dim: int):
    def call(dtype):
        import torch
        k, v = _randn(7, 8, head_dim, dtype=dtype), _randn(7, 8, head_dim, dtype=dtype)
        kc, vc = _randn(4, 16, 8, head_dim, dtype=dtype), _randn(4, 16, 8, head_dim, dtype=dtype)
        slots = torch.tensor([0, 1, 17, -1, 40, 63, 5], dtype=torch.int64)
        _tk("reshape_and_cache").reshape_and_cache(k, v, kc, vc, slots)
    return call


@functools.lru_cache(maxsize=None)
def _quantized(bits: int, n: int, k: int):
    import torch
    from lepton_kernels.ops.quantize import quantize
    return quantize(_randn(n, k, dtype=torch.float32), bits, 128 if bits == 4 else None)


def _quant_case(bits: int, m: int, bias: bool, n: int = 4096, k: int = 4096):
    def call(dtype):
        qw = dataclasses.replace(_quantized(bits, n, k), dtype=dtype)
        x = _randn(m, k, dtype=dtype)
        _tk("quant_matmul").quant_matmul(x, qw, _randn(n, dtype=dtype) if bias else None)
    return call


def _selftest_bad_dot(dtype):
    """A kernel the interpreter runs but the compiler rejects (tl.dot needs dims >= 16): proves
    that a compile error is caught and reported."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _selftest_bad_dot_kernel(a_ptr, out_ptr, B: tl.constexpr):
        offs = tl.arange(0, B)
        a = tl.load(a_ptr + offs[:, None] * B + offs[None, :])
        tl.store(out_ptr + offs[:, None] * B + offs[None, :], tl.dot(a, a).to(a.dtype))

    a = _randn(8, 8, dtype=dtype)
    _selftest_bad_dot_kernel[(1,)](a, torch.empty_like(a), B=8)


SELFTEST = "selftest_bad_dot"


def cases() -> list[Case]:
    """Every launcher path at production-like shapes; ``default`` ones run in the fast test."""
    return [
        Case("rms_norm", _norm_case(False, False), ("_rms_norm_kernel",), default=True),
        Case("rms_norm_residual", _norm_case(True, False), ("_rms_norm_kernel",)),
        Case("layer_norm", _norm_case(False, True), ("_layer_norm_kernel",)),
        Case("layer_norm_residual_bias", _norm_case(True, True), ("_layer_norm_kernel",), default=True),
        Case("rotary_neox_d128", _rotary_case(128, 128, True), ("_rotary_kernel",), default=True),
        Case("rotary_gptj_d128", _rotary_case(128, 128, False), ("_rotary_kernel",)),
        Case("rotary_neox_d80", _rotary_case(80, 80, True), ("_rotary_kernel",)),
        Case("rotary_partial_d128_rot64", _rotary_case(128, 64, True), ("_rotary_kernel",)),
        Case("silu_and_mul", _act_case("silu"), ("_gated_act_kernel",), default=True),
        Case("gelu_and_mul", _act_case("none"), ("_gated_act_kernel",)),
        Case("gelu_tanh_and_mul", _act_case("tanh"), ("_gated_act_kernel",)),
        Case("flash_prefill_causal_d128", _flash_case(128, 200, True), ("_flash_attention_kernel",),
             default=True),
        Case("flash_short_causal_d128", _flash_case(128, 40, True), ("_flash_attention_kernel",)),
        Case("flash_prefill_noncausal_d80", _flash_case(80, 200, False), ("_flash_attention_kernel",),
             default=True),
        Case("flash_prefill_window_d128", _flash_case(128, 200, True, 64), ("_flash_attention_kernel",)),
        Case("paged_decode_d128", _paged_case(128, 64, 1, 300), ("_paged_attention_kernel",),
             default=True),
        Case("paged_decode_split_d128", _paged_case(128, 1, 1, 2048),
             ("_paged_attention_kernel", "_merge_splits_kernel"), default=True),
        Case("paged_decode_d80", _paged_case(80, 64, 1, 300), ("_paged_attention_kernel",)),
        Case("paged_chunked_prefill_d128", _paged_case(128, 4, 64, 200), ("_paged_attention_kernel",),
             default=True),
        Case("paged_decode_window_d128", _paged_case(128, 64, 1, 300, 128), ("_paged_attention_kernel",)),
        Case("reshape_and_cache_d128", _cache_case(128), ("_reshape_and_cache_kernel",), default=True),
        Case("reshape_and_cache_d80", _cache_case(80), ("_reshape_and_cache_kernel",)),
        Case("quant_matmul_int8_m1", _quant_case(8, 1, True), ("_gemv_kernel",), default=True),
        Case("quant_matmul_int4g128_m1", _quant_case(4, 1, False), ("_gemv_kernel",), default=True),
        Case("quant_matmul_int8_m64", _quant_case(8, 64, False), ("_tiled_kernel",), default=True),
        Case("quant_matmul_int4g128_m64", _quant_case(4, 64, True), ("_tiled_kernel",), default=True),
    ]


def _all_cases() -> list[Case]:
    return cases() + [Case(SELFTEST, _selftest_bad_dot, ("_selftest_bad_dot_kernel",), ("fp16",))]


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------

def run(arches: list[int], dtypes: list[str], full: bool, spills: bool,
        only: list[str] | None = None) -> dict:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return {"error": "TRITON_INTERPRET must be 0 in the compile process", "results": []}
    if problem := cuda_toolchain_problem():
        return {"error": None, "skip": problem, "results": []}
    if problem := api_problem():
        return {"error": problem, "results": []}
    import torch
    modules = [_tk(name) for name in KERNEL_MODULES]
    results = []
    for arch in arches:
        with fake_gpu(arch, modules):
            for case in _all_cases():
                wanted = case.name in only if only else (full or case.default) and case.name != SELFTEST
                if not wanted:
                    continue
                for dt in dtypes:
                    if dt not in case.dtypes:
                        continue
                    launches: list[Launch] = []
                    t0 = time.perf_counter()
                    with compile_instead_of_launch(launches):
                        try:
                            case.call(getattr(torch, DTYPE_NAMES[dt]))
                        except Exception as err:   # the launcher itself failed
                            launches.append(Launch("<launcher>", False, _describe(err), 0.0))
                    seen = {l.kernel for l in launches}
                    for name in case.expect:
                        if name not in seen and "<launcher>" not in seen:
                            launches.append(Launch(name, False, f"the launcher never launched {name} "
                                                   f"(launched: {sorted(seen)}): update the case", 0.0))
                    for l in launches:
                        row = {"case": case.name, "arch": arch, "dtype": dt, "kernel": l.kernel,
                               "ok": l.ok, "error": l.error, "seconds": round(l.seconds, 3),
                               "constexprs": {k: repr(v) for k, v in l.constexprs.items()}}
                        if l.compiled is not None:
                            row.update(resource_usage(l.compiled, arch, spills))
                            if row.get("arch_compiled") not in (None, arch):
                                row["ok"] = False
                                row["error"] = f"compiled for arch {row['arch_compiled']}, not {arch}"
                        results.append(row)
                    results[-1]["case_seconds"] = round(time.perf_counter() - t0, 3)
    return {"error": None, "results": results}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, action="append", help="80, 90, ... (default: 80 and 90)")
    p.add_argument("--dtype", action="append", choices=sorted(DTYPE_NAMES),
                   help="default: fp16, bf16, fp32")
    p.add_argument("--full", action="store_true", help="every case, not just the default subset")
    p.add_argument("--case", action="append", help="only these cases")
    p.add_argument("--spills", action="store_true", help="also run ptxas -v for spill counts")
    p.add_argument("--table", action="store_true", help="print a table instead of JSON")
    a = p.parse_args(argv)
    try:
        out = run(a.arch or [80, 90], a.dtype or ["fp16", "bf16", "fp32"], a.full, a.spills, a.case)
    except Exception as err:  # report, never crash obscurely
        import traceback
        out = {"error": f"compile harness crashed: {_describe(err)}\n{traceback.format_exc()}",
               "results": []}
    if a.table:
        if out.get("error") or out.get("skip"):
            print(out.get("error") or f"skip: {out['skip']}")
        for r in out["results"]:
            status = "ok" if r["ok"] else "FAIL"
            print(f"{r['case']:30s} sm{r['arch']} {r['dtype']:4s} {r['kernel']:26s} {status:4s} "
                  f"regs={r.get('regs')} shared={r.get('shared')} stack={r.get('stack')} "
                  f"spills={r.get('spill_stores')}/{r.get('spill_loads')} warps={r.get('num_warps')} "
                  f"stages={r.get('num_stages')} {r['seconds']:.2f}s")
            if not r["ok"]:
                print("    " + (r["error"] or "").replace("\n", "\n    ")[:3000])
    else:
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
