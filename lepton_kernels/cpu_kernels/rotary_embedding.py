"""CPU rotary_embedding: RoPE applied in place to q and k by a small C kernel (rotary_embedding.c).

For token t at position p = positions[t], with h = rot_dim / 2 and cos_sin_cache[p] =
[cos(p * inv_freq) | sin(p * inv_freq)], every head x of q[t] and k[t] has its pairs rotated
    (x1, x2) -> (x1 cos_i - x2 sin_i,  x2 cos_i + x1 sin_i),   i < h,
pairs (x[i], x[i + h]) for neox and (x[2i], x[2i + 1]) interleaved (GPT-J); x[rot_dim:] is left
alone. q and k are written through their strides (views of a fused qkv output), nothing else.

Why: the eager spec costs ~120 us a layer at decode shapes, almost all of it in the dozen small
tensor ops it launches (gather, float casts, chunk, four multiplies, cat, copy_). The kernel is
one pass over the rotated elements, with the same float32 rounding as the spec (each product,
then the sum), so its results are the eager spec's bits.

Scope: float32 q, k and cos_sin_cache on the CPU, head_dim and the table's columns contiguous
(any token and head strides, any positions stride); anything else goes to eager (``supports``).
Positions are range-checked in C before anything is written; on a bad one the spec's own
check_args raises, so the message is the eager one and q and k are untouched. No autograd
(inputs that require grad go to eager); the version counters are bumped as an in-place op does.
"""

from __future__ import annotations

import ctypes
import struct

import torch
from torch.autograd.graph import increment_version

from ..ops.rotary_embedding import check_args
from . import jit_build

SOURCE = "rotary_embedding.c"
_F32, _I64, _I32 = torch.float32, torch.int64, torch.int32
# lk_rotary_embedding's arguments, one int64 each in this order (rotary_embedding.c's enum), passed
# as one packed block: ctypes takes ~2.5 us to convert seventeen separate arguments, ~0.6 us to
# pack them and pass one pointer.
_FIELDS = ("positions", "pos_stride", "is_int64", "tokens", "q", "q_tok", "q_head", "hq", "k",
           "k_tok", "k_head", "hk", "cache", "cache_row", "max_position", "rot_dim", "is_neox")
_PACK = struct.Struct(f"{len(_FIELDS)}q").pack


def _library() -> tuple[ctypes.CDLL | None, str | None]:
    lib, why = jit_build.load(SOURCE)
    if lib is not None and lib.lk_rotary_embedding.argtypes is None:
        if lib.lk_rotary_embedding_nargs() != len(_FIELDS):
            return None, f"{SOURCE} takes {lib.lk_rotary_embedding_nargs()} arguments, not {len(_FIELDS)}"
        lib.lk_rotary_embedding.restype = ctypes.c_int
        lib.lk_rotary_embedding.argtypes = [ctypes.c_char_p]   # the packed block, read only
    return lib, why


def available() -> str | None:
    """None when the kernel is built (compiling it on first call), else why not."""
    return _library()[1]


def supports(positions, q, k, cos_sin_cache, is_neox=True) -> bool | str:
    """Whether the kernel handles these inputs (float32, head_dim and the table's columns
    contiguous, no autograd). Malformed inputs are accepted: the kernel then runs the spec's
    check_args, which raises the eager error naming the problem, also when "cpu" was forced."""
    try:
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or cos_sin_cache.requires_grad):
            return "q, k or cos_sin_cache requires grad and the cpu kernel has no backward"
        if q.dtype is _F32 and k.dtype is _F32 and cos_sin_cache.dtype is _F32:
            if q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1:
                return True
            why = "the cpu kernel needs head_dim and the cos_sin_cache columns contiguous"
        else:
            why = "the cpu kernel needs float32 q, k and cos_sin_cache"
        check_args(positions, q, k, cos_sin_cache, is_neox, check_range=False)
    except (AttributeError, TypeError, IndexError, RuntimeError, ValueError):
        return True
    return why


def _arguments(positions, q, k, cos_sin_cache, is_neox) -> bytes | None:
    """The kernel's packed arguments when the inputs are ones it handles (all of check_args but the
    positions' range, plus float32, CPU and the contiguity it needs), else None. A decode step
    makes one call a layer, so this is a few attribute reads instead of check_args' dozens."""
    try:
        (t,), (tq, hq, d), (tk, hk, dk), (max_position, rot) = (positions.shape, q.shape, k.shape,
                                                                 cos_sin_cache.shape)
        (pos_stride,), (q_tok, q_head, q_dim) = positions.stride(), q.stride()
        (k_tok, k_head, k_dim), (cache_row, cache_col) = k.stride(), cos_sin_cache.stride()
        pos_dtype = positions.dtype
        ok = (tq == t and tk == t and dk == d and 0 < rot <= d and not rot & 1
              and type(is_neox) is bool and (pos_dtype is _I64 or pos_dtype is _I32)
              and q.dtype is _F32 and k.dtype is _F32 and cos_sin_cache.dtype is _F32
              and q.is_cpu and k.is_cpu and positions.is_cpu and cos_sin_cache.is_cpu
              and q_dim == 1 and k_dim == 1 and cache_col == 1
              # in place: no broadcast (stride 0) token or head dimension
              and (q_tok or t < 2) and (q_head or hq < 2) and (k_tok or t < 2) and (k_head or hk < 2))
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return None   # not tensors, wrong ranks, or no strides (sparse): check_args says which
    if not ok:
        return None
    return _PACK(positions.data_ptr(), pos_stride, pos_dtype is _I64, t, q.data_ptr(), q_tok, q_head, hq,
                 k.data_ptr(), k_tok, k_head, hk, cos_sin_cache.data_ptr(), cache_row, max_position, rot,
                 is_neox)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor, is_neox: bool = True):
    """positions[T] int32/int64, q[T,Hq,D], k[T,Hk,D], cos_sin_cache[max_pos, rot_dim], all float32
    on the CPU -> (q, k), rotated in place (the same tensor objects)."""
    args = _arguments(positions, q, k, cos_sin_cache, is_neox)
    if args is None:
        check_args(positions, q, k, cos_sin_cache, is_neox, check_range=False)   # raises, naming it
        why = supports(positions, q, k, cos_sin_cache, is_neox)
        raise ValueError(f"rotary_embedding cpu kernel: {why if why is not True else 'unsupported inputs'}")
    lib, why = _library()
    if lib is None:
        raise RuntimeError(f"rotary_embedding cpu kernel unavailable: {why}")
    if lib.lk_rotary_embedding(args):
        check_args(positions, q, k, cos_sin_cache, is_neox)   # raises the spec's range error
        raise RuntimeError("rotary_embedding cpu kernel refused positions that check_args accepts")
    # Written behind autograd's back: bump the version counters as copy_ would, so a q or k
    # saved for a backward pass is reported as modified instead of silently differing.
    increment_version(q)
    increment_version(k)
    return q, k
