"""Triton RMSNorm with the fused residual add: one program per token row.

Rows of up to MAX_BLOCK elements stay in registers: each program reads x (and residual) once,
reduces sum(s^2) in float32 and writes y (and s = x + residual) once, 2 reads + 2 writes of T x H.
Wider rows would spill (the compile report for the one-block kernel: 64-84 registers and first
spills at hidden 16384 fp32; at 65536 every dtype spills, hundreds of bytes at fp16/bf16 and
kilobytes at fp32, on sm_80 and sm_90), so they are walked in MAX_BLOCK-wide chunks, twice:
pass 1 writes s and accumulates sum(s^2) per lane; pass 2 re-reads x (and residual) to write y.
Pass 2 re-adds x + residual instead of reading s back because y normalizes the unrounded float32
sum (the spec); those reads of a just-read row should mostly hit L2 (not yet measured on a GPU).
Any hidden size works.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.rms_norm import check_args

# Elements of a row one program holds at once (per tensor). 8192 is the widest block that compiles
# without spills at fp16/bf16/fp32 on sm_80 and sm_90 with 16 warps (16 fp32 values per thread).
# Module-level so tests can lower it and reach the chunked path at small sizes.
MAX_BLOCK = 8192


def row_launch_config(hidden: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for the one-row-per-program norm kernels (rms_norm and layer_norm):
    BLOCK = next power of two of hidden, capped at MAX_BLOCK (BLOCK < hidden selects the chunked
    loop); ~16 elements per thread, from 1 warp for tiny rows up to 16 warps (512 threads)."""
    block = min(triton.next_power_of_2(hidden), MAX_BLOCK)
    return block, max(1, min(16, block // 512))


def rows(t: torch.Tensor) -> torch.Tensor:
    """t with unit stride along the hidden dim (a row view of a wider tensor stays a view)."""
    return t if t.stride(1) == 1 else t.contiguous()


@triton.jit
def load_sum(x_row, r_row, cols, mask, HAS_RESIDUAL: tl.constexpr):
    """s = x (+ residual) over ``cols`` of one row, in float32; masked lanes are 0."""
    s = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(r_row + cols, mask=mask, other=0.0).to(tl.float32)
    return s


@triton.jit
def _rms_norm_kernel(
    x_ptr, x_row_stride,      # x: [T, H], unit column stride
    r_ptr, r_row_stride,      # residual: [T, H] (unused unless HAS_RESIDUAL)
    w_ptr,                    # weight: [H], contiguous
    y_ptr, y_row_stride,      # y: [T, H] out
    s_ptr, s_row_stride,      # s = x + residual: [T, H] out (unused unless HAS_RESIDUAL)
    H, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr,  # ONE_BLOCK: H <= BLOCK
):
    row = tl.program_id(0).to(tl.int64)
    x_row, r_row = x_ptr + row * x_row_stride, r_ptr + row * r_row_stride
    y_row, s_row = y_ptr + row * y_row_stride, s_ptr + row * s_row_stride
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:  # the whole row in registers: read once, write once
        mask = cols < H
        s = load_sum(x_row, r_row, cols, mask, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            tl.store(s_row + cols, s.to(s_ptr.dtype.element_ty), mask=mask)
        # masked lanes are 0, so they add nothing to the sum of squares
        rstd = tl.rsqrt(tl.sum(s * s, axis=0) / H + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, (s * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        sum_sq = tl.zeros([BLOCK], dtype=tl.float32)  # per-lane partial sums, reduced once
        for start in range(0, H, BLOCK):
            c = start + cols
            mask = c < H
            s = load_sum(x_row, r_row, c, mask, HAS_RESIDUAL)
            if HAS_RESIDUAL:
                tl.store(s_row + c, s.to(s_ptr.dtype.element_ty), mask=mask)
            sum_sq += s * s
        rstd = tl.rsqrt(tl.sum(sum_sq, axis=0) / H + eps)
        for start in range(0, H, BLOCK):
            c = start + cols
            mask = c < H
            s = load_sum(x_row, r_row, c, mask, HAS_RESIDUAL)
            w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + c, (s * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)


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
            HAS_RESIDUAL=residual is not None, BLOCK=block, ONE_BLOCK=hidden <= block,
            num_warps=num_warps)
    return y if residual is None else (y, s)
