"""The accelerated backends: whether they can run here, and the helpers op files register with.

Nothing here imports triton: an op file registers its Triton launcher through a small ``load``
function that imports the kernel module in its body, run on the first call that selects it, so
``import lepton_kernels`` stays light and works without triton. The native extension
``lepton_kernels._C`` is loaded here once (ext.py wraps its calls); it is optional.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from typing import Any, Callable, Mapping, Sequence

import torch

from .registry import Impl, Op, register_impl

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=None)
def triton_available() -> str | None:
    """None when triton can be imported, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        import triton  # noqa: F401
    except Exception as err:  # a broken install must not break the registry
        return f"triton failed to import: {err}"
    return None


def register_triton(op: Op, load: Callable[[], Callable], *, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
                    supports: Callable[..., Any] | None = None,
                    priority: int | Mapping[Any, int] = 0) -> Impl:
    """Register the launcher ``load()`` returns as the ``triton`` implementation of ``op``:
    automatic on CUDA tensors, explicit-only on CPU under TRITON_INTERPRET=1."""
    return register_impl(op, "triton", load=load, device_types=["cuda"], dtypes=dtypes,
                         available=triton_available, supports=supports, interpret_on_cpu=True,
                         priority=priority)


@functools.cache
def cpu_kernel_module(name: str):
    """``lepton_kernels/cpu_kernels/<name>.py``, imported on first use: each such module imports
    its op file's check_args, so it cannot be imported while that op file loads."""
    return importlib.import_module(f"{__package__}.cpu_kernels.{name}")


def register_cpu(op: Op, *, dtypes: Sequence[torch.dtype], supports: Callable[..., Any] | None = None,
                 priority: int | Mapping[Any, int] = 0) -> Impl:
    """Register the function ``<op>`` of ``cpu_kernels/<op>.py`` (C compiled on first use, called
    through ctypes) as the ``cpu`` implementation of ``op``: automatic on CPU tensors, available
    when that module's ``available()`` says its C source built (no compiler: eager runs)."""
    def load():
        return getattr(cpu_kernel_module(op.name), op.name)

    return register_impl(op, "cpu", load=load, device_types=["cpu"], dtypes=dtypes,
                         available=lambda: cpu_kernel_module(op.name).available(), supports=supports,
                         priority=priority)


def _load_native():
    if os.environ.get("LEPTON_NO_EXT") == "1":
        return None, "disabled by LEPTON_NO_EXT=1"
    try:
        # setup.py builds the extension as lepton_kernels._C; this is the one place that loads it.
        return importlib.import_module(f"{__package__}._C"), None
    except ImportError as err:
        return None, (f"lepton_kernels._C is not built ({err}); it builds on install when a C++17 "
                      "compiler is present and LEPTON_NO_EXT is not 1")


_NATIVE, _NATIVE_WHY_NOT = _load_native()
# The cache copies move bytes, so every dtype the caches may have (fp8 included) is supported.
NATIVE_CACHE_DTYPES = FLOAT_DTYPES + ((torch.float8_e4m3fn,) if hasattr(torch, "float8_e4m3fn") else ())


def native_module():
    """The loaded ``lepton_kernels._C`` module, or None when it is not built (see native_why_not)."""
    return _NATIVE


def native_why_not() -> str | None:
    """None when ``_C`` is loaded, else why not (an ``available`` check for its implementations)."""
    return _NATIVE_WHY_NOT


def native_device_types() -> list[str]:
    """Device types ``_C``'s cache kernels run on: cpu, plus cuda when it was built with nvcc."""
    return ["cpu", "cuda"] if _NATIVE is not None and _NATIVE.has_cuda() else ["cpu"]
