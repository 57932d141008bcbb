"""Compile instead of launch: a fake CUDA device, a JIT hook, and what ptxas says about the result.

A launcher (the function the op registry calls) runs on small CPU tensors while
``fake_gpu(arch)`` makes Triton's active driver report GPUTarget("cuda", arch, 32) and makes
torch.cuda's device queries answer as that GPU would. ``compile_instead_of_launch`` replaces
JITFunction.run so that every ``kernel[grid](...)`` compiles (``warmup=True``) and is recorded
instead of running: signature, specialisation and constexprs are exactly the launcher's.
``resource_usage`` then reads registers from cuobjdump, spills from ``ptxas -v`` and counts the
tensor-core instructions of the PTX. Nothing here needs a GPU; all of it needs
TRITON_INTERPRET=0 when the kernel modules are imported.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import os
import re
import subprocess
import tempfile
import time
import types
from dataclasses import dataclass, field
from typing import Callable

SM_COUNT = {80: 108, 86: 84, 89: 128, 90: 132}        # A100, A10/3090, L4/4090, H100/H200
# Most dynamic shared memory one block may use (bytes): a bigger config compiles but fails to launch.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
TENSOR_CORE_PREFIXES = ("mma.", "wgmma.mma_async")   # not wgmma.fence / commit_group / wait_group


def toolchain_problem(arches=(80, 90)) -> str | None:
    """None when this triton install can compile CUDA kernels to cubin here, else why not."""
    try:
        from triton.backends import backends
    except Exception as err:
        return f"triton cannot be imported: {err!r}"
    if "nvidia" not in backends:
        return f"triton has no nvidia backend (backends: {sorted(backends)})"
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        for arch in arches:
            path = get_ptxas(arch).path
            if not (path and os.access(path, os.X_OK)):
                return f"ptxas for sm_{arch} is missing: {path!r}"
    except Exception as err:
        return f"triton's ptxas cannot be located: {err!r}"
    return None


def api_problem() -> str | None:
    """None when the triton internals this module drives are there, else what differs."""
    import triton
    from triton.runtime import jit as jit_mod
    from triton.runtime.driver import driver

    run = getattr(jit_mod.JITFunction, "run", None)
    params = inspect.signature(run).parameters if run else {}
    if not {"grid", "warmup"} <= set(params):
        return (f"triton {triton.__version__}: JITFunction.run(*args, grid, warmup, **kwargs) "
                f"expected, found {list(params)}")
    if not hasattr(driver, "set_active"):
        return f"triton {triton.__version__}: triton.runtime.driver.driver.set_active is missing"
    return None


class FakeCudaDriver:
    """Just what JITFunction.run(warmup=True) asks the active driver for."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.arch, self.target = arch, GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return self.arch             # also the key of Triton's per-device kernel caches

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        import torch
        return torch.device("cuda", 0)


def _device_helpers(module) -> list[tuple[str, Callable]]:
    """Plain lepton_kernels functions in a kernel module's namespace (defined there or imported
    from a config module) that take a ``device`` argument: the launch heuristics."""
    out = []
    for name, fn in vars(module).items():
        if not callable(fn) or not str(getattr(fn, "__module__", "")).startswith("lepton_kernels."):
            continue
        target = getattr(fn, "__wrapped__", fn)
        if inspect.isfunction(target) and "device" in inspect.signature(target).parameters:
            out.append((name, fn))
    return out


def _as_cuda(fn, cuda_dev):
    """fn, except that a CPU ``device`` argument arrives as cuda:0 (heuristics branch on it)."""
    import torch
    sig = inspect.signature(getattr(fn, "__wrapped__", fn))

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        dev = bound.arguments.get("device")
        if isinstance(dev, torch.device) and dev.type == "cpu":
            bound.arguments["device"] = cuda_dev
        return fn(*bound.args, **bound.kwargs)
    return wrapper


def _clear_caches(modules) -> None:
    """lru_caches of launch heuristics (SM count, ...) must not leak from one target to the next."""
    for m in modules:
        for fn in vars(m).values():
            if hasattr(fn, "cache_clear") and getattr(fn, "__module__", None) == m.__name__:
                fn.cache_clear()


@contextlib.contextmanager
def fake_gpu(arch: int, modules: list):
    """Triton's driver and torch.cuda's queries answer as an sm_<arch> GPU while inside."""
    import torch
    from triton.runtime.driver import driver

    cap = divmod(arch, 10)
    props = types.SimpleNamespace(name=f"fake sm_{arch}", major=cap[0], minor=cap[1],
                                  multi_processor_count=SM_COUNT.get(arch, 108),
                                  total_memory=80 << 30)
    saved_cuda = {n: getattr(torch.cuda, n) for n in
                  ("get_device_capability", "get_device_properties", "current_device")}
    torch.cuda.get_device_capability = lambda device=None: cap
    torch.cuda.get_device_properties = lambda device=None: props
    torch.cuda.current_device = lambda: 0
    saved_helpers = [(m, name, fn) for m in modules for name, fn in _device_helpers(m)]
    for m, name, fn in saved_helpers:
        setattr(m, name, _as_cuda(fn, torch.device("cuda", 0)))
    _clear_caches(modules)
    driver.set_active(FakeCudaDriver(arch))
    try:
        yield
    finally:
        try:   # back to the real driver (built on demand)
            driver.reset_active()
        except RuntimeError:   # no GPU here, so no real driver to return to: the fake stays active
            pass
        for m, name, fn in saved_helpers:
            setattr(m, name, fn)
        for n, fn in saved_cuda.items():
            setattr(torch.cuda, n, fn)
        _clear_caches(modules)


@dataclass
class Launch:
    kernel: str
    error: str | None
    seconds: float
    compiled: object = None
    constexprs: dict = field(default_factory=dict)


@contextlib.contextmanager
def compile_instead_of_launch(launches: list):
    """Every kernel[grid](...) compiles and is recorded, and never runs; a compile error is
    recorded and swallowed so that the launcher goes on to its next kernel."""
    from triton.runtime.jit import JITFunction
    orig = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        t0 = time.perf_counter()
        consts = {k: v for k, v in kwargs.items() if not hasattr(v, "data_ptr")}
        try:
            kernel = orig(self, *args, grid=grid, warmup=True, **kwargs)
        except Exception as err:  # the compiler's error, reported per kernel
            launches.append(Launch(self.fn.__name__, describe_error(err),
                                   time.perf_counter() - t0, None, consts))
            return None
        launches.append(Launch(self.fn.__name__, None, time.perf_counter() - t0, kernel, consts))
        return kernel

    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = orig


def describe_error(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    if len(text) > 6000:
        text = text[:3000] + "\n...\n" + text[-3000:]
    return text


def tensor_core_instructions(ptx: str) -> int:
    """Count of mma.sync (sm_80+) and wgmma.mma_async (sm_90) instruction lines in the PTX; an
    optional predicate (``@%p1``) is skipped. wgmma's fence/commit/wait lines are not counted."""
    count = 0
    for line in ptx.splitlines():
        text = line.strip()
        if text.startswith("@"):
            text = text.partition(" ")[2].lstrip()
        count += text.startswith(TENSOR_CORE_PREFIXES)
    return count


def resource_usage(kernel, arch: int, spills: bool = True) -> dict:
    """registers / static shared / stack from cuobjdump on the cubin, Triton's dynamic shared
    memory from the metadata, spill bytes from ``ptxas -v`` on the PTX, tensor-core count."""
    from triton import knobs

    meta = kernel.metadata
    target = getattr(meta, "target", None)
    info = {"num_warps": getattr(meta, "num_warps", None),
            "num_stages": getattr(meta, "num_stages", None),
            "arch_compiled": getattr(target, "arch", None), "registers": None, "stack": None,
            "shared_bytes": getattr(meta, "shared", None) or 0, "spill_stores": None,
            "spill_loads": None, "spills": None,
            "tensor_core_instructions": tensor_core_instructions(kernel.asm.get("ptx") or "")}
    cubin = kernel.asm.get("cubin")
    if not cubin:
        return info
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", path],
                             capture_output=True, text=True, timeout=120).stdout
        if m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out):
            info["registers"], info["stack"] = int(m[1]), int(m[2])
            info["shared_bytes"] += int(m[3])   # static shared, next to Triton's dynamic
        if spills and kernel.asm.get("ptx"):
            fusion = getattr(meta, "enable_fp_fusion", True)
            info.update(_ptxas_spills(kernel.asm["ptx"], arch, tmp, fusion))
    return info


def _ptxas_spills(ptx: str, arch: int, tmp: str, fp_fusion: bool = True) -> dict:
    """Spill bytes from ``ptxas -v`` with the flags Triton's own ptxas run uses (register
    allocation differs without them); cached by the PTX's hash next to Triton's cache."""
    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    flags = ["-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}"]
    if not fp_fusion:
        flags.insert(0, "--fmad=false")
    key = hashlib.sha256("\0".join([ptx, *flags]).encode()).hexdigest()
    cache = os.path.join(knobs.cache.dir, "lepton_compile_report", f"{key}.json")
    with contextlib.suppress(OSError, ValueError):
        with open(cache) as f:
            return json.load(f)
    src = os.path.join(tmp, "k.ptx")
    with open(src, "w") as f:
        f.write(ptx)
    log = subprocess.run([get_ptxas(arch).path, *flags, src, "-o", os.path.join(tmp, "k.o")],
                         capture_output=True, text=True, timeout=300).stderr
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not m:
        return {}
    out = {"spill_stores": int(m[1]), "spill_loads": int(m[2]), "spills": int(m[1]) + int(m[2])}
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        with open(cache + f".{os.getpid()}", "w") as f:
            json.dump(out, f)
        os.replace(cache + f".{os.getpid()}", cache)   # atomic: parallel workers share the cache
    return out
