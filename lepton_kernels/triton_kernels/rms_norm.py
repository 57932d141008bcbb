"""Triton RMSNorm with the fused residual add: one program per token row.

Each program reads its row of x (and residual) once, keeps it in registers, reduces sum(s^2)
in float32 and writes y (and s = x + residual) once: 2 reads + 2 writes of T x H in all.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.rms_norm import _check as check_args

def row_launch_config(hidden: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a one-row-per-program kernel: ~16 fp32 elements per thread,
    1 warp for tiny rows up to 16 warps (512 threads) for H >= 8192."""
    block = triton.next_power_of_2(hidden)
    return block, max(1, min(16, block // 512))


def rows(t: torch.Tensor) -> torch.Tensor:
    """t with unit stride along the hidden dim (a row view of a wider tensor stays a view)."""
    return t if t.stride(1) == 1 else t.contiguous()


@triton.jit
def _rms_norm_kernel(
    x_ptr, x_row_stride,      # x: [T, H], unit column stride
    r_ptr, r_row_stride,      # residual: [T, H] (unused unless HAS_RESIDUAL)
    w_ptr,                    # weight: [H], contiguous
    y_ptr, y_row_stride,      # y: [T, H] out
    s_ptr, s_row_stride,      # s = x + residual: [T, H] out (unused unless HAS_RESIDUAL)
    H, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    s = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(r_ptr + row * r_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(s_ptr + row * s_row_stride + cols, s.to(s_ptr.dtype.element_ty), mask=mask)
    # masked lanes are 0, so they add nothing to the sum of squares
    rstd = tl.rsqrt(tl.sum(s * s, axis=0) / H + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * y_row_stride + cols, (s * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
             residual: torch.Tensor | None = None):
    """Same contract as lepton_kernels.ops.rms_norm.rms_norm."""
    check_args(x, weight, eps, residual)
    tokens, hidden = x.shape
    x, weight = rows(x), weight.contiguous()
    y = torch.empty((tokens, hidden), dtype=x.dtype, device=x.device)
    s = torch.empty_like(y) if residual is not None else None
    if tokens > 0 and hidden > 0:
        r = rows(residual) if residual is not None else x
        block, num_warps = row_launch_config(hidden)
        _rms_norm_kernel[(tokens,)](
            x, x.stride(0), r, r.stride(0), weight, y, y.stride(0),
            s if s is not None else y, y.stride(0), hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps)
    return y if residual is None else (y, s)
