"""CPU paged_attention: the new tokens of each sequence against its paged KV cache, in C.

Same contract as the eager spec (lepton_kernels/ops/paged_attention.py): for sequence b with
n = seq_lens[b] cached tokens and q_len = cu_seqlens_q[b+1] - cu_seqlens_q[b] new ones (its last
positions p_i = n - q_len + i), query head h reads kv head h // (Hq // Hk) and
    out_i = sum_{lo_i <= j <= p_i} softmax_j(scale * <q_i, k_j>) v_j,
    lo_i = max(0, p_i - W + 1) with a sliding window W, else 0,
k_j / v_j read in place from cache block block_tables[b, j // BS], row j % BS.

Why not the eager spec on a CPU: it gathers every sequence's K/V into a padded copy and runs
SDPA over it, and its deep argument check reads the index tensors with a dozen small torch ops:
~260 us per layer for one decode token at 100 tokens of context (~65 us of them the check).
paged_attention.c reads K/V through the block table without a copy, with an online softmax in
float32, the query heads of a kv head sharing each K/V row; it validates the index tensors
itself (a few integer loops). On a violation it computes nothing and this wrapper runs the
eager deep check, which raises the eager spec's exact ValueError. Reads: q (any strides with a
dense head_dim), the caches, block_tables rows (dense last dim), seq_lens, cu_seqlens_q; only
the table entries and cache rows of positions each sequence owns. Output: a new [T, Hq, D]
tensor in q's dtype (float16 / bfloat16 computed in float32, rounded once).
"""

from __future__ import annotations

import ctypes
import math
import struct

import torch

from ..ops.paged_attention import check_args
from ..ops.paged_attention import paged_attention as _op
from . import jit_build

SOURCE = "paged_attention.c"
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_BAD_INPUT, _NO_MEMORY, _NO_DTYPE = 1, 2, 3
_I64_MAX = 2**63 - 1
# paged_attention.c's args_t: 8-byte fields, native byte order. One packed buffer is one ctypes
# argument (~0.5 us with the packing); 23 separate arguments cost ~3 us to convert.
_ARGS = struct.Struct("=19qd3q")
_kernel = None     # lk_paged_attention, once built and typed
_eager = _op.eager   # for dtypes the kernel lacks (direct calls: the registry sends them to eager)


def _library() -> tuple[ctypes.CDLL | None, str | None]:
    global _kernel
    lib, why = jit_build.load(SOURCE)
    if lib is not None and _kernel is None:
        lib.lk_paged_attention.argtypes = [ctypes.c_char_p]   # bytes: passed without a copy
        lib.lk_paged_attention.restype = ctypes.c_int
        lib.lk_paged_attention_has_f16.restype = ctypes.c_int
        _kernel = lib.lk_paged_attention
    return lib, why


def available() -> str | None:
    """None when the kernel is built (compiling it on first call), else why not."""
    return _library()[1]


def has_float16() -> bool:
    """Whether the compiler has _Float16 (gcc >= 12, clang >= 15 on x86-64 / arm64)."""
    lib = _library()[0]
    return lib is not None and bool(lib.lk_paged_attention_has_f16())


def _well_formed(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q,
                 max_seqlen_k, scale, sliding_window) -> bool:
    """check_args(deep=False)'s conditions in the form the engine passes them, as attribute
    reads (~2 us instead of ~7), and a dtype the kernel has: True means they hold; False sends
    the call to check_args, which names the problem or accepts a less usual form (an int scale,
    say; a float64 q then goes to the eager spec)."""
    try:
        (_, hq, d), (_, bs, hk, d_k) = q.shape, k_cache.shape
        return (d_k == d and hk and bs and not hq % hk and v_cache.shape == k_cache.shape
                and v_cache.dtype is q.dtype is k_cache.dtype and q.dtype in _DTYPES
                and block_tables.dim() == 2 and seq_lens.dim() == 1 and cu_seqlens_q.dim() == 1
                and block_tables.dtype is seq_lens.dtype is cu_seqlens_q.dtype is torch.int32
                and 0 < seq_lens.shape[0] == block_tables.shape[0] == cu_seqlens_q.shape[0] - 1
                and q.is_cpu and k_cache.is_cpu and v_cache.is_cpu and block_tables.is_cpu
                and seq_lens.is_cpu and cu_seqlens_q.is_cpu
                and type(max_seqlen_q) is int and max_seqlen_q >= 0
                and type(max_seqlen_k) is int and max_seqlen_k >= 0
                and (scale is None or type(scale) is float and math.isfinite(scale))
                and (sliding_window is None or type(sliding_window) is int and sliding_window > 0))
    except (AttributeError, TypeError, ValueError):
        return False


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    max_seqlen_q: int, max_seqlen_k: int, scale: float | None = None,
                    sliding_window: int | None = None) -> torch.Tensor:
    """q[T,Hq,D], k/v_cache[NB,BS,Hk,D], block_tables[B,max_blocks], seq_lens[B],
    cu_seqlens_q[B+1] (int32, CPU) -> out[T,Hq,D] in q's dtype (see the module doc)."""
    # Shapes, dtypes, devices and scalars only: the index tensors are checked in C.
    if not _well_formed(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q,
                        max_seqlen_k, scale, sliding_window):
        check_args(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q,
                   max_seqlen_k, scale, sliding_window, deep=False)
    dtype = _DTYPES.get(q.dtype)
    if dtype is None:
        return _eager(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q,
                      max_seqlen_k, scale, sliding_window)
    if _kernel is None:
        why = _library()[1]
        if why is not None:
            raise RuntimeError(f"paged_attention cpu kernel unavailable: {why}")
    t, hq, d = q.shape
    num_blocks, block_size, hk, _ = k_cache.shape
    q_strides = q.stride()
    if q_strides[2] != 1:   # a q split off a fused qkv projection keeps stride 1 here
        q = q.contiguous()
        q_strides = q.stride()
    # No-ops for the engine's tensors (contiguous caches, fresh index tensors).
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    table_strides = block_tables.stride()
    if table_strides[1] != 1:
        block_tables = block_tables.contiguous()
        table_strides = block_tables.stride()
    seq_lens, cu_seqlens_q = seq_lens.contiguous(), cu_seqlens_q.contiguous()
    out = torch.empty(t, hq, d, dtype=q.dtype)
    code = _kernel(_ARGS.pack(
        q.data_ptr(), q_strides[0], q_strides[1], k_cache.data_ptr(), v_cache.data_ptr(), num_blocks,
        block_size, hk, d, block_tables.data_ptr(), table_strides[0], block_tables.shape[1],
        seq_lens.data_ptr(), cu_seqlens_q.data_ptr(), seq_lens.shape[0], t, hq,
        min(max_seqlen_q, _I64_MAX), min(max_seqlen_k, _I64_MAX),
        1.0 / math.sqrt(d) if scale is None else float(scale),
        0 if sliding_window is None else min(sliding_window, _I64_MAX),   # W >= any context: none
        dtype, out.data_ptr()))
    if code == 0:
        return out
    if code == _BAD_INPUT:
        check_args(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q,
                   max_seqlen_k, scale, sliding_window, deep=True)   # raises the eager message
        raise RuntimeError("paged_attention cpu kernel rejected inputs the eager check accepts")
    if code == _NO_DTYPE:   # float16 without a compiler that has _Float16
        return _eager(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q,
                      max_seqlen_k, scale, sliding_window)
    raise MemoryError("paged_attention cpu kernel: no memory for its scratch")
