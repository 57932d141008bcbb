"""Availability checks and registration helpers for the accelerated backends.

Nothing here imports triton: kernels are registered as lazy ``"module:function"`` references
and imported on first use, so ``import lepton_kernels`` stays light and works without triton.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any, Callable, Sequence

import torch

from ..registry import Impl, register_impl

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


def register_triton(op: str, fn: str, *, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
                    supports: Callable[..., Any] | None = None) -> Impl:
    """Register ``lepton_kernels.triton_kernels.<fn>`` as the ``triton`` implementation of ``op``:
    automatic on CUDA tensors, explicit-only on CPU under TRITON_INTERPRET=1."""
    return register_impl(op, "triton", f"lepton_kernels.triton_kernels.{fn}", device_types=["cuda"],
                         dtypes=dtypes, available=triton_available, supports=supports,
                         interpret_on_cpu=True)
