"""Attention of new tokens against a paged KV cache (PagedAttention, Kwon et al. 2023,
arXiv:2309.06180): one op for decode, chunked prefill and prefill after a cached prefix.

Sequence b has seq_lens[b] tokens in the cache, the token at position p in slot
    block_tables[b, p // BS] * BS + p % BS       (k_cache/v_cache: [num_blocks, BS, Hk, D])
Its q_len_b = cu_seqlens_q[b+1] - cu_seqlens_q[b] new queries are its LAST positions
seq_lens[b] - q_len_b ... seq_lens[b] - 1, whose K/V are already written to the cache, and each
attends causally to the cached tokens up to and including itself:
    out_i = sum_{j <= p_i} softmax_j(scale * <q_i, k_j>) * v_j,    p_i = seq_lens[b] - q_len_b + i
This is flash_attention(causal=True) on the sequence's cached K/V (bottom-right alignment), with
the same GQA mapping (query head h reads kv head h // (Hq // Hk)), scale default 1/sqrt(D) and
sliding window (keys p_i - W + 1 .. p_i, Hugging Face / Mistral semantics); see flash_attention.
Decode is q_len_b == 1. Block-table entries past a sequence's last block are never read.
Softmax in float32; the output is a new tensor in q's dtype. The Triton kernels
(triton_kernels/paged_attention*.py) run decode sequences in GQA-packed programs (the query heads
of a kv head as the rows of one tile) and the others in query tiles, read K/V a whole cache block
at a time, and split long contexts across programs when the batch is small (flash-decoding).
On CPU tensors the C kernel of cpu_kernels/paged_attention.c runs instead of this spec (float32,
float16, bfloat16): K/V read in place through the block table with an online softmax, the index
tensors validated in C (an invalid call raises this file's messages through check_args).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..backends import cpu_kernel_module, register_cpu, register_triton
from ..checks import check_same, check_same_device, check_tensor, randn
from ..registry import SampleInput, register_op
from .flash_attention import (attention_padded, check_cu_seqlens, check_window_args, gather_rows,
                              sequence_groups, token_index)

TRITON_HEAD_DIMS = (64, 80, 96, 128, 256)


def check_args(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, max_seqlen_k,
               scale, sliding_window, deep: bool = True):
    """Shape/dtype checks; ``deep`` also reads the index tensors (host sync) and returns
    (cu_seqlens_q, seq_lens) as lists. The Triton launcher runs it with deep=False."""
    check_tensor("q", q, 3, floating=True)
    check_tensor("k_cache", k_cache, 4, floating=True)
    check_tensor("v_cache", v_cache, 4, floating=True)
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q, k_cache and v_cache must share a dtype, got {q.dtype}, "
                         f"{k_cache.dtype}, {v_cache.dtype}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} must equal k_cache shape "
                         f"{tuple(k_cache.shape)}")
    check_same("k_cache.shape[3] (head_dim)", k_cache.shape[3], "q.shape[2] (head_dim)", q.shape[2])
    if k_cache.shape[2] == 0 or q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k_cache heads "
                         f"({k_cache.shape[2]})")
    if k_cache.shape[1] == 0:
        raise ValueError("k_cache.shape[1] (block_size) must be positive")
    check_tensor("block_tables", block_tables, 2, dtypes=(torch.int32,))
    check_tensor("seq_lens", seq_lens, 1, dtypes=(torch.int32,))
    check_tensor("cu_seqlens_q", cu_seqlens_q, 1, dtypes=(torch.int32,))
    check_same("block_tables.shape[0]", block_tables.shape[0], "seq_lens.shape[0]", seq_lens.shape[0])
    check_same("cu_seqlens_q.shape[0]", cu_seqlens_q.shape[0], "seq_lens.shape[0] + 1",
               seq_lens.shape[0] + 1)
    if seq_lens.shape[0] == 0:
        raise ValueError("seq_lens must hold at least one sequence")
    check_window_args(scale, sliding_window, max_seqlen_q, max_seqlen_k)
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                      seq_lens=seq_lens, cu_seqlens_q=cu_seqlens_q)
    if not deep:
        return None
    cu_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "max_seqlen_q", max_seqlen_q)
    lens = seq_lens.tolist()
    capacity = block_tables.shape[1] * k_cache.shape[1]
    for b, n in enumerate(lens):
        if not cu_q[b + 1] - cu_q[b] <= n <= min(capacity, max_seqlen_k):
            raise ValueError(f"seq_lens[{b}] = {n} must lie between its query count "
                             f"{cu_q[b + 1] - cu_q[b]} and min(block_tables.shape[1] * block_size "
                             f"= {capacity}, max_seqlen_k = {max_seqlen_k})")
    used = (torch.arange(block_tables.shape[1], device=seq_lens.device)[None, :] * k_cache.shape[1]
            < seq_lens[:, None])
    bad = used & ((block_tables < 0) | (block_tables >= k_cache.shape[0]))
    if bad.any():
        b, i = bad.nonzero()[0].tolist()
        raise ValueError(f"block_tables[{b}, {i}] = {int(block_tables[b, i])} is not a block of "
                         f"k_cache (num_blocks {k_cache.shape[0]})")
    return cu_q, lens


@register_op
def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    max_seqlen_q: int, max_seqlen_k: int, scale: float | None = None,
                    sliding_window: int | None = None) -> torch.Tensor:
    """q[T,Hq,D], k/v_cache[NB,BS,Hk,D], block_tables[B,max_blocks], seq_lens[B],
    cu_seqlens_q[B+1] (all int32) -> out[T,Hq,D] (see module doc)."""
    cu_q, k_lens = check_args(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q,
                              max_seqlen_k, scale, sliding_window)
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else float(scale)
    q_lens = [b - a for a, b in zip(cu_q, cu_q[1:])]
    if min(q_lens) == max(q_lens) == 1:  # one query per sequence: a decode step
        return _decode(q, k_cache, v_cache, block_tables, seq_lens, k_lens, scale, sliding_window)
    _, block_size, hk, d = k_cache.shape
    out = torch.zeros_like(q)
    for group in sequence_groups(q_lens, k_lens):
        lq, lk = [q_lens[b] for b in group], [k_lens[b] for b in group]
        q_tok, q_valid = token_index([cu_q[b] for b in group], lq, q.device)
        idx = torch.tensor(group, device=q.device)
        k_len = torch.tensor(lk, device=q.device)
        # Gather the group's blocks in one indexing op; unused table entries read block 0.
        n_blocks = -(-max(lk) // block_size)
        table = block_tables[idx, :n_blocks].long()
        live = torch.arange(n_blocks, device=q.device)[None, :] * block_size < k_len[:, None]
        table = torch.where(live, table, torch.zeros_like(table))
        keys = gather_rows(k_cache, table).reshape(len(group), n_blocks * block_size, hk, d)
        values = gather_rows(v_cache, table).reshape(len(group), n_blocks * block_size, hk, d)
        res = attention_padded(gather_rows(q, q_tok), keys, values, torch.tensor(lq, device=q.device), k_len,
                               True, scale, sliding_window)
        out.index_copy_(0, q_tok[q_valid], res[q_valid].to(q.dtype))
    return out


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
            seq_lens: torch.Tensor, k_lens: list[int], scale: float, sliding_window: int | None) -> torch.Tensor:
    """The decode case (one query per sequence, at its last position) without grouping: gather the
    first max(seq_lens) slots of every sequence at once and run one batched attention in which
    the G query heads of a kv head are G query rows (GQA without repeating K/V)."""
    b, hq, d = q.shape
    _, block_size, hk, _ = k_cache.shape
    max_len = max(k_lens)
    pos = torch.arange(max_len, device=q.device)
    slots = block_tables[:, pos // block_size].long() * block_size + pos % block_size   # [B, L]
    visible = None
    if min(k_lens) < max_len or (sliding_window is not None and sliding_window < max_len):
        lens = seq_lens.long()[:, None]
        visible = pos[None, :] < lens
        if sliding_window is not None:
            visible &= pos[None, :] > lens - 1 - sliding_window
        # Hidden positions read the sequence's own first slot instead: it is in the cache (every
        # position below seq_len is), so it holds finite numbers, and the mask gives it weight 0.
        # (Table entries past a sequence's last block may point anywhere, even at never-written
        # memory whose NaN would survive the mask as 0 * NaN.)
        slots = torch.where(visible, slots, slots[:, :1])
    acc = torch.promote_types(q.dtype, torch.float32)
    # index_select copies whole rows; advanced indexing is several times slower on CPU.
    flat = slots.view(-1)
    keys = k_cache.view(-1, hk * d).index_select(0, flat).view(b, -1, hk, d).to(acc)    # [B, L, Hk, D]
    values = v_cache.view(-1, hk * d).index_select(0, flat).view(b, -1, hk, d).to(acc)
    mask = None if visible is None else visible[:, None, None, :]                 # [B, 1, 1, L]
    out = F.scaled_dot_product_attention(q.to(acc).view(b, hk, hq // hk, d), keys.transpose(1, 2),
                                         values.transpose(1, 2), attn_mask=mask, scale=scale)
    return out.reshape(b, hq, d).to(q.dtype)


@paged_attention.set_sample_inputs
def sample_inputs(device="cpu", dtype=torch.float32) -> list[SampleInput]:
    g = torch.Generator().manual_seed(1)
    samples = []
    block_size, num_blocks = 16, 12
    # (name, q lens, seq lens, Hq, Hk, D, sliding_window)
    for name, lq, lk, hq, hk, d, window in [
        ("decode_gqa4_d80", [1, 1, 1], [1, 37, 16], 8, 2, 80, None),
        ("prefill_prefix_d64", [16, 5, 1], [16, 37, 17], 7, 1, 64, None),
        ("window_chunked_d80", [17, 1], [37, 33], 2, 2, 80, 9),
    ]:
        k_cache = randn(num_blocks, block_size, hk, d, device=device, dtype=dtype, generator=g)
        v_cache = randn(num_blocks, block_size, hk, d, device=device, dtype=dtype, generator=g)
        # Shuffled, non-contiguous blocks; unused entries hold -1 as an engine would pad them.
        perm = torch.randperm(num_blocks, generator=g)
        table = torch.full((len(lk), 4), -1, dtype=torch.int32)
        used = 0
        for b, n in enumerate(lk):
            count = -(-n // block_size)
            table[b, :count] = perm[used:used + count].to(torch.int32)
            used += count
        q = randn(sum(lq), hq, d, device=device, dtype=dtype, generator=g)
        cu = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32)
        samples.append(SampleInput(name, (q, k_cache, v_cache, table.to(device),
                                          torch.tensor(lk, dtype=torch.int32, device=device),
                                          cu.to(device), max(lq), max(lk)),
                                   {"sliding_window": window}))
    return samples


def triton_supports(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q,
                    max_seqlen_k, scale=None, sliding_window=None):
    """Shapes the Triton kernels are built for (anything else falls back to eager): the head dims
    of their config table, and power-of-two block sizes (a key tile is whole blocks or a slice of
    one block; the engine only makes powers of two). It runs on every call, so it reads just two
    shapes and spells out the op's parameters (binding them costs less than packing *args)."""
    try:
        (_, _, head_dim), (_, block_size, _, _) = q.shape, k_cache.shape
    except (AttributeError, TypeError, ValueError):
        return True   # not tensors of these ranks: the launcher's argument check names the problem
    if head_dim not in TRITON_HEAD_DIMS:
        return f"head_dim {head_dim} not supported by the triton kernel {TRITON_HEAD_DIMS}"
    if block_size & (block_size - 1):
        return f"block_size {block_size} (k_cache.shape[1]) is not a power of two"
    return True


def load_triton():
    """The Triton launcher (imports triton: runs on the first call that selects it)."""
    from ..triton_kernels.paged_attention import paged_attention as launcher
    return launcher


register_triton(paged_attention, load_triton, supports=triton_supports)


def cpu_supports(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q,
                 max_seqlen_k, scale=None, sliding_window=None):
    """Per call, a few attribute reads: calls that need gradients go to eager (the kernel has no
    backward), and so does float16 where the compiler lacks _Float16. Arguments of the wrong
    kind pass, so that the kernel's check names them.
    No limit on the query length: at the ~55M Llama's shapes (Hq 8, Hk 2, D 64, BS 16; one
    thread, 2-core AVX2 VM) the kernel beat this spec on every prefill measured, q_len = seq_len
    = 64 / 512 / 1024 / 4096: 0.19 / 7.3 / 27 / 431 ms against 1.4 / 12.5 / 45 / 868 ms."""
    try:
        if torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad or v_cache.requires_grad):
            return "an input requires grad and the cpu kernel has no backward"
        if q.dtype == torch.float16 and not cpu_kernel_module("paged_attention").has_float16():
            return "the C compiler has no _Float16"
    except AttributeError:
        pass
    return True


register_cpu(paged_attention, dtypes=(torch.float32, torch.float16, torch.bfloat16), supports=cpu_supports)
