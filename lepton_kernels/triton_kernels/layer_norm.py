"""Triton LayerNorm with the fused residual add: one program per token row.

Same memory traffic as the RMSNorm kernel (2 reads + 2 writes of T x H): the row stays in
registers for the two reductions (mean, then the centered sum of squares, which is more
accurate than E[x^2] - E[x]^2 when the mean is large).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.layer_norm import _check as check_args
from .rms_norm import row_launch_config, rows


@triton.jit
def _layer_norm_kernel(
    x_ptr, x_row_stride,      # x: [T, H], unit column stride
    r_ptr, r_row_stride,      # residual: [T, H] (unused unless HAS_RESIDUAL)
    w_ptr, b_ptr,             # weight, bias: [H], contiguous (bias unused unless HAS_BIAS)
    y_ptr, y_row_stride,      # y: [T, H] out
    s_ptr, s_row_stride,      # s = x + residual: [T, H] out (unused unless HAS_RESIDUAL)
    H, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    s = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(r_ptr + row * r_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(s_ptr + row * s_row_stride + cols, s.to(s_ptr.dtype.element_ty), mask=mask)
    mean = tl.sum(s, axis=0) / H
    centered = tl.where(mask, s - mean, 0.0)  # masked lanes must not add mean^2 to the variance
    rstd = tl.rsqrt(tl.sum(centered * centered, axis=0) / H + eps)
    y = centered * rstd * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * y_row_stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5,
               residual: torch.Tensor | None = None):
    """Same contract as lepton_kernels.ops.layer_norm.layer_norm."""
    check_args(x, weight, bias, eps, residual)
    tokens, hidden = x.shape
    x, weight = rows(x), weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    y = torch.empty((tokens, hidden), dtype=x.dtype, device=x.device)
    s = torch.empty_like(y) if residual is not None else None
    if tokens > 0 and hidden > 0:
        r = rows(residual) if residual is not None else x
        block, num_warps = row_launch_config(hidden)
        _layer_norm_kernel[(tokens,)](
            x, x.stride(0), r, r.stride(0), weight, bias if bias is not None else weight,
            y, y.stride(0), s if s is not None else y, y.stride(0), hidden, eps,
            HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, BLOCK=block,
            num_warps=num_warps)
    return y if residual is None else (y, s)
