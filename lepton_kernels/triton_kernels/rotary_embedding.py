"""Triton rotary embedding: q and k of one token per program, in a single launch.

Each program loads its token's cos/sin row once and applies it to every q head and every k head
(a [heads, rot_dim/2] tile per tensor), then copies the pass-through dims rot_dim..D of partial
rotary. q and k may be strided views (e.g. slices of a fused qkv projection); the outputs are
new contiguous tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.rotary_embedding import _check as check_args


@triton.jit
def _rotate_heads(
    src, src_head_stride, dst, dst_head_stride,  # one token of x: [H, D], unit stride along D
    cos, sin, i, i_mask,                         # [BLOCK_HALF] float32, pair index, pair mask
    H, D, HALF,
    IS_NEOX: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    h = tl.arange(0, BLOCK_H)[:, None]
    h_mask = h < H
    if IS_NEOX:  # pairs (i, i + rot_dim/2)
        c1 = i
        c2 = i + HALF
    else:        # pairs (2i, 2i + 1)
        c1 = 2 * i
        c2 = 2 * i + 1
    mask = h_mask & i_mask[None, :]
    x1 = tl.load(src + h * src_head_stride + c1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + h * src_head_stride + c2[None, :], mask=mask, other=0.0).to(tl.float32)
    out_ty = dst.dtype.element_ty
    tl.store(dst + h * dst_head_stride + c1[None, :], (x1 * cos - x2 * sin).to(out_ty), mask=mask)
    tl.store(dst + h * dst_head_stride + c2[None, :], (x2 * cos + x1 * sin).to(out_ty), mask=mask)
    if BLOCK_PASS > 0:  # partial rotary: dims 2 * HALF .. D are copied unchanged
        c = 2 * HALF + tl.arange(0, BLOCK_PASS)[None, :]
        pass_mask = h_mask & (c < D)
        x = tl.load(src + h * src_head_stride + c, mask=pass_mask)
        tl.store(dst + h * dst_head_stride + c, x.to(out_ty), mask=pass_mask)


@triton.jit
def _rotary_kernel(
    positions_ptr,                               # [T] int32 / int64
    q_ptr, q_token_stride, q_head_stride,        # q: [T, HQ, D], unit stride along D
    k_ptr, k_token_stride, k_head_stride,        # k: [T, HK, D], unit stride along D
    qo_ptr, qo_token_stride, qo_head_stride,     # q' out
    ko_ptr, ko_token_stride, ko_head_stride,     # k' out
    cache_ptr, cache_stride,                     # cos_sin_cache: [max_pos, 2 * HALF], unit column stride
    HQ, HK, D, HALF,
    IS_NEOX: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + t).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    i_mask = i < HALF
    cos = tl.load(cache_ptr + pos * cache_stride + i, mask=i_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cache_ptr + pos * cache_stride + HALF + i, mask=i_mask, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr + t * q_token_stride, q_head_stride, qo_ptr + t * qo_token_stride, qo_head_stride,
                  cos, sin, i, i_mask, HQ, D, HALF, IS_NEOX, BLOCK_HQ, BLOCK_PASS)
    _rotate_heads(k_ptr + t * k_token_stride, k_head_stride, ko_ptr + t * ko_token_stride, ko_head_stride,
                  cos, sin, i, i_mask, HK, D, HALF, IS_NEOX, BLOCK_HK, BLOCK_PASS)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor, is_neox: bool = True):
    """Same contract as lepton_kernels.ops.rotary_embedding.rotary_embedding, except that
    out-of-range positions are not checked (that would cost a device sync per call)."""
    check_args(positions, q, k, cos_sin_cache, is_neox, check_range=False)
    tokens, hq, d = q.shape
    hk = k.shape[1]
    half = cos_sin_cache.shape[1] // 2
    q, k = _unit_last_stride(q), _unit_last_stride(k)
    cache, positions = _unit_last_stride(cos_sin_cache), positions.contiguous()
    q_out = torch.empty((tokens, hq, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((tokens, hk, d), dtype=k.dtype, device=k.device)
    if tokens == 0:
        return q_out, k_out
    block_hq, block_hk = triton.next_power_of_2(hq), triton.next_power_of_2(hk)
    block_half = triton.next_power_of_2(half)
    block_pass = triton.next_power_of_2(d - 2 * half) if d > 2 * half else 0
    # ~8 elements of a [heads, rot_dim/2] tile per thread; at most 8 warps (e.g. 64 heads x 64 pairs).
    num_warps = max(1, min(8, block_hq * block_half // 256))
    _rotary_kernel[(tokens,)](
        positions, q, q.stride(0), q.stride(1), k, k.stride(0), k.stride(1),
        q_out, q_out.stride(0), q_out.stride(1), k_out, k_out.stride(0), k_out.stride(1),
        cache, cache.stride(0), hq, hk, d, half,
        IS_NEOX=is_neox, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half,
        BLOCK_PASS=block_pass, num_warps=num_warps)
    return q_out, k_out
