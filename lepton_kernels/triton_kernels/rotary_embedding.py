"""Triton rotary embedding, in place: q and k of one token per program, in a single launch.

Each program loads its token's cos/sin row once and rotates every q head and every k head
(a [heads, rot_dim/2] tile of pairs per tensor) where they lie, through their strides, so q and k
can be views into a fused qkv projection's output without a copy. The pass-through dims
rot_dim..D of partial rotary are neither read nor written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.rotary_embedding import check_args


@triton.jit
def _rotate_heads_inplace(
    x, head_stride, dim_stride,                  # one token of x: [H, D]
    cos, sin, i, i_mask,                         # [1, BLOCK_HALF] float32, pair index, pair mask
    H, HALF,
    IS_NEOX: tl.constexpr, BLOCK_H: tl.constexpr,
):
    h = tl.arange(0, BLOCK_H)[:, None]
    if IS_NEOX:  # pairs (i, i + rot_dim/2)
        c1 = i
        c2 = i + HALF
    else:        # pairs (2i, 2i + 1)
        c1 = 2 * i
        c2 = 2 * i + 1
    mask = (h < H) & i_mask[None, :]
    p1 = x + h * head_stride + c1[None, :] * dim_stride
    p2 = x + h * head_stride + c2[None, :] * dim_stride
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    # Both stores depend on both loads, so every element is read before it is overwritten.
    ty = x.dtype.element_ty
    tl.store(p1, (x1 * cos - x2 * sin).to(ty), mask=mask)
    tl.store(p2, (x2 * cos + x1 * sin).to(ty), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr, pos_stride,                            # [T] int32 / int64
    q_ptr, q_token_stride, q_head_stride, q_dim_stride,   # q: [T, HQ, D], rotated in place
    k_ptr, k_token_stride, k_head_stride, k_dim_stride,   # k: [T, HK, D], rotated in place
    cache_ptr, cache_row_stride, cache_col_stride,        # cos_sin_cache: [max_pos, 2 * HALF]
    HQ, HK, HALF,
    IS_NEOX: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + t * pos_stride).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    i_mask = i < HALF
    row = cache_ptr + pos * cache_row_stride
    cos = tl.load(row + i * cache_col_stride, mask=i_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(row + (HALF + i) * cache_col_stride, mask=i_mask, other=0.0).to(tl.float32)[None, :]
    _rotate_heads_inplace(q_ptr + t * q_token_stride, q_head_stride, q_dim_stride,
                          cos, sin, i, i_mask, HQ, HALF, IS_NEOX, BLOCK_HQ)
    _rotate_heads_inplace(k_ptr + t * k_token_stride, k_head_stride, k_dim_stride,
                          cos, sin, i, i_mask, HK, HALF, IS_NEOX, BLOCK_HK)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor, is_neox: bool = True):
    """Same contract as lepton_kernels.ops.rotary_embedding.rotary_embedding (q and k rotated in
    place and returned), except that out-of-range positions are not checked (that would cost a
    device sync per call)."""
    check_args(positions, q, k, cos_sin_cache, is_neox, check_range=False)
    tokens, hq, _ = q.shape
    hk = k.shape[1]
    half = cos_sin_cache.shape[1] // 2
    if tokens == 0:
        return q, k
    block_hq, block_hk = triton.next_power_of_2(hq), triton.next_power_of_2(hk)
    block_half = triton.next_power_of_2(half)
    # ~8 pairs of a [heads, rot_dim/2] tile per thread; at most 8 warps (e.g. 64 heads x 64 pairs).
    num_warps = max(1, min(8, block_hq * block_half // 256))
    # Strides go to the kernel as they are: a stride of 1 (the usual last dim) is specialized by
    # Triton's launcher, so views cost nothing extra and nothing is made contiguous.
    _rotary_kernel[(tokens,)](
        positions, positions.stride(0),
        q, q.stride(0), q.stride(1), q.stride(2), k, k.stride(0), k.stride(1), k.stride(2),
        cos_sin_cache, cos_sin_cache.stride(0), cos_sin_cache.stride(1), hq, hk, half,
        IS_NEOX=is_neox, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half,
        num_warps=num_warps)
    return q, k
