"""Argument checks shared by the ops and their kernels: a bad call raises ValueError naming the
argument, before any kernel sees it (never a deep torch or Triton traceback)."""

from __future__ import annotations

import torch


def check_tensor(name: str, t, ndim: int | None = None, *, floating: bool = False,
                 dtypes: tuple[torch.dtype, ...] | None = None) -> torch.Tensor:
    """``t`` is a tensor with ``ndim`` dimensions (and a floating / one of ``dtypes`` dtype)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must have dtype {names}, got {str(t.dtype).removeprefix('torch.')}")
    return t


def check_same(name_a: str, a: int, name_b: str, b: int) -> None:
    """Two sizes that must agree, named in the message."""
    if a != b:
        raise ValueError(f"{name_a} ({a}) must equal {name_b} ({b})")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Every tensor given (None entries are skipped) lives on one device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"tensors must be on one device: {listing}")


def randn(*shape: int, device, dtype, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Seeded Gaussian sample input, drawn in fp32 on CPU so every device sees the same values."""
    return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)
