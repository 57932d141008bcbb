"""Triton LayerNorm with the fused residual add: one program per token row.

Rows of up to MAX_BLOCK elements (see rms_norm.py) stay in registers, with the RMSNorm kernel's
traffic (2 reads + 2 writes of T x H): mean, then the centered sum of squares, which is more
accurate than E[x^2] - E[x]^2 when the mean is large. Wider rows are walked in chunks, twice.
Pass 1 writes s and merges per-chunk statistics with Chan et al.'s parallel update (the pairwise
form of Welford's algorithm): a chunk of n_b elements with mean m_b and centered sum of squares
M2_b joins the n_a elements seen so far (mean m_a, M2_a) as
    n = n_a + n_b,  d = m_b - m_a,  mean = m_a + d * n_b / n,  M2 = M2_a + M2_b + d^2 * n_a * n_b / n
so nothing is ever computed as a difference of large sums. Pass 2 re-reads x (and residual)
and writes y = (s - mean) * rsqrt(M2 / H + eps) * w + b.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.layer_norm import check_args
from .rms_norm import load_sum, row_launch_config, rows


@triton.jit
def _layer_norm_kernel(
    x_ptr, x_row_stride,      # x: [T, H], unit column stride
    r_ptr, r_row_stride,      # residual: [T, H] (unused unless HAS_RESIDUAL)
    w_ptr, b_ptr,             # weight, bias: [H], contiguous (bias unused unless HAS_BIAS)
    y_ptr, y_row_stride,      # y: [T, H] out
    s_ptr, s_row_stride,      # s = x + residual: [T, H] out (unused unless HAS_RESIDUAL)
    H, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    ONE_BLOCK: tl.constexpr,  # H <= BLOCK: the whole row in registers
):
    row = tl.program_id(0).to(tl.int64)
    x_row, r_row = x_ptr + row * x_row_stride, r_ptr + row * r_row_stride
    y_row, s_row = y_ptr + row * y_row_stride, s_ptr + row * s_row_stride
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        mask = cols < H
        s = load_sum(x_row, r_row, cols, mask, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            tl.store(s_row + cols, s.to(s_ptr.dtype.element_ty), mask=mask)
        mean = tl.sum(s, axis=0) / H
        centered = tl.where(mask, s - mean, 0.0)  # masked lanes must not add mean^2 to the variance
        rstd = tl.rsqrt(tl.sum(centered * centered, axis=0) / H + eps)
        y = centered * rstd * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # (count, mean, M2) of the elements seen so far, merged chunk by chunk
        count = tl.zeros([], dtype=tl.float32)
        mean = tl.zeros([], dtype=tl.float32)
        m2 = tl.zeros([], dtype=tl.float32)
        for start in range(0, H, BLOCK):
            c = start + cols
            mask = c < H
            s = load_sum(x_row, r_row, c, mask, HAS_RESIDUAL)
            if HAS_RESIDUAL:
                tl.store(s_row + c, s.to(s_ptr.dtype.element_ty), mask=mask)
            n_b = tl.sum(mask.to(tl.float32), axis=0)  # BLOCK, or fewer in the last chunk
            mean_b = tl.sum(s, axis=0) / n_b
            centered = tl.where(mask, s - mean_b, 0.0)
            delta = mean_b - mean
            n = count + n_b
            m2 += tl.sum(centered * centered, axis=0) + delta * delta * (count * n_b / n)
            mean += delta * (n_b / n)
            count = n
        rstd = tl.rsqrt(m2 / H + eps)
        for start in range(0, H, BLOCK):
            c = start + cols
            mask = c < H
            s = load_sum(x_row, r_row, c, mask, HAS_RESIDUAL)
            y = (s - mean) * rstd * tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y += tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + c, y.to(y_ptr.dtype.element_ty), mask=mask)


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
            ONE_BLOCK=hidden <= block, num_warps=num_warps)
    return y if residual is None else (y, s)
