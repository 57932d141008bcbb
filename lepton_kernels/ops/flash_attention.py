"""Variable-length multi-head attention over a flattened batch (FlashAttention-2 interface,
Dao 2023, arXiv:2307.08691): the math is plain softmax attention, the kernel is the tiling.

Sequence b owns queries q[cu_seqlens_q[b]:cu_seqlens_q[b+1]] (Lq of them) and keys / values
k, v[cu_seqlens_k[b]:cu_seqlens_k[b+1]] (Lk of them). For query i and key j of that sequence,
with query head h reading kv head h // (Hq // Hk) (GQA; MQA when Hk == 1):
    s_ij = scale * <q_i, k_j>        (scale defaults to 1 / sqrt(D))
    out_i = sum_j softmax_j(s_ij over the visible j) * v_j
Visibility. Queries are bottom-right aligned: query i sits at key position p_i = i + Lk - Lq,
so the last query faces the last key (a decode step, a prefill after a cached prefix).
    causal=True:   j visible iff j <= p_i
    sliding_window=W (causal): additionally j > p_i - W, i.e. the W keys p_i-W+1 .. p_i. This is
                   Hugging Face's sliding-window mask (kv_idx > q_idx - W, Mistral / Qwen2 /
                   Gemma) and flash-attn's window_size=(W-1, 0).
    causal=False:  every key is visible; with sliding_window=W, j visible iff |j - p_i| < W,
                   flash-attn's window_size=(W-1, W-1) (what transformers passes flash-attn for
                   bidirectional windows; its SDPA mask allows |j - p_i| <= W: pass W + 1).
A query row that sees no key (p_i < 0 under causal alignment when Lq > Lk, or Lk == 0) outputs
zeros. Scores and softmax in float32 (or wider); the output has q's dtype and is a new tensor.
The eager path pads sequences of similar lengths into groups (see sequence_groups); the Triton
kernel (triton_kernels/flash_attention.py) takes head_dim 64, 80, 96, 128 and 256.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..backends import register_triton
from ..checks import check_same, check_same_device, check_tensor, randn
from ..registry import SampleInput, register_op

# Bytes of float32 scores materialized at once by the eager path (larger queries are chunked).
_SCORE_BYTES = 1 << 28


def check_window_args(scale, sliding_window, max_seqlen_q, max_seqlen_k) -> None:
    """Scalar arguments shared with paged_attention."""
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be None or a finite number, got {scale!r}")
    if sliding_window is not None and (isinstance(sliding_window, bool)
                                       or not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window must be None or a positive int, got {sliding_window!r}")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def check_cu_seqlens(name: str, cu: torch.Tensor, total: int, max_name: str, max_len: int) -> list[int]:
    """Full check of a cu_seqlens tensor (reads it): 0, non-decreasing, ends at ``total``."""
    values = cu.tolist()
    if values[0] != 0 or values[-1] != total:
        raise ValueError(f"{name} must start at 0 and end at {total} (the token count), "
                         f"got {values[0]} .. {values[-1]}")
    lens = [b - a for a, b in zip(values, values[1:])]
    if lens and min(lens) < 0:
        raise ValueError(f"{name} must be non-decreasing, got {values}")
    if lens and max(lens) > max_len:
        raise ValueError(f"a sequence in {name} has {max(lens)} tokens, more than {max_name} "
                         f"({max_len})")
    return values


def check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
               sliding_window, deep: bool = True):
    """Shape/dtype checks; ``deep`` also reads cu_seqlens (one host sync) and returns them.
    The Triton launcher runs it with deep=False."""
    check_tensor("q", q, 3, floating=True)
    check_tensor("k", k, 3, floating=True)
    check_tensor("v", v, 3, floating=True)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if v.shape != k.shape:
        raise ValueError(f"v shape {tuple(v.shape)} must equal k shape {tuple(k.shape)}")
    check_same("k.shape[2] (head_dim)", k.shape[2], "q.shape[2] (head_dim)", q.shape[2])
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k heads ({k.shape[1]})")
    check_tensor("cu_seqlens_q", cu_seqlens_q, 1, dtypes=(torch.int32,))
    check_tensor("cu_seqlens_k", cu_seqlens_k, 1, dtypes=(torch.int32,))
    if cu_seqlens_q.shape[0] < 2:
        raise ValueError(f"cu_seqlens_q must have B+1 >= 2 entries, got {cu_seqlens_q.shape[0]}")
    check_same("cu_seqlens_k.shape[0]", cu_seqlens_k.shape[0], "cu_seqlens_q.shape[0]",
               cu_seqlens_q.shape[0])
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {type(causal).__name__}")
    check_window_args(scale, sliding_window, max_seqlen_q, max_seqlen_k)
    check_same_device(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    if deep:
        return (check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "max_seqlen_q", max_seqlen_q),
                check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "max_seqlen_k", max_seqlen_k))
    return None


def sequence_groups(q_lens: list[int], k_lens: list[int]) -> list[list[int]]:
    """Batch sequences into groups padded to a common (Lq, Lk) with at most ~2x wasted work.

    Sorting by (Lq, Lk) puts decode steps of similar length together, so a decode batch is one
    or a few groups while a long prefill does not pad everything else to its length. Sequences
    without queries or keys are left out (their rows are zeros).
    """
    order = sorted((b for b in range(len(q_lens)) if q_lens[b] and k_lens[b]),
                   key=lambda b: (q_lens[b], k_lens[b]), reverse=True)
    groups: list[list[int]] = []
    work = max_k = 0
    for b in order:
        if groups:
            group = groups[-1]
            new_max_k = max(max_k, k_lens[b])
            padded = (len(group) + 1) * q_lens[group[0]] * new_max_k
            if padded <= 2 * (work + q_lens[b] * k_lens[b]) or padded <= 4096:
                group.append(b)
                work, max_k = work + q_lens[b] * k_lens[b], new_max_k
                continue
        groups.append([b])
        work, max_k = q_lens[b] * k_lens[b], k_lens[b]
    return groups


def attention_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lens: torch.Tensor,
                     k_lens: torch.Tensor, causal: bool, scale: float,
                     sliding_window: int | None) -> torch.Tensor:
    """The math of the module docstring on a padded group: q[n,Mq,Hq,D], k/v[n,Mk,Hk,D],
    q_lens/k_lens[n] (int64, on q's device) -> out[n,Mq,Hq,D] in float32 (or wider);
    padded query rows come back as zeros. Long query blocks are processed in chunks."""
    n, mq, hq, d = q.shape
    mk, hk = k.shape[1], k.shape[2]
    group = hq // hk
    acc = torch.promote_types(q.dtype, torch.float32)
    key_idx = torch.arange(mk, device=q.device)
    # Padding keys are masked, but the mask is added to the scores and 0 * NaN = NaN: clear
    # whatever the padding holds (a paged cache's unused slots are uninitialized memory).
    pad = (key_idx[None, :] >= k_lens[:, None])[:, :, None, None]
    kh = k.masked_fill(pad, 0).to(acc).permute(0, 2, 1, 3)               # [n, Hk, Mk, D]
    vh = v.masked_fill(pad, 0).to(acc).permute(0, 2, 1, 3)
    # The G query heads of a kv head become G blocks of query rows against the same K/V
    # (GQA without repeating K/V); they share one mask.
    qh = q.to(acc).view(n, mq, hk, group, d).permute(0, 2, 3, 1, 4)    # [n, Hk, G, Mq, D]
    out = torch.empty(n, hk, group, mq, d, dtype=acc, device=q.device)
    chunk = max(1, _SCORE_BYTES // (4 * n * hq * max(mk, 1)))
    for i0 in range(0, mq, chunk):
        rows = torch.arange(i0, min(mq, i0 + chunk), device=q.device)
        c = len(rows)
        pos = rows[None, :, None] + (k_lens - q_lens)[:, None, None]       # [n, C, 1] key position
        keys = key_idx[None, None, :]
        visible = (keys < k_lens[:, None, None]) & (rows[None, :, None] < q_lens[:, None, None])
        if causal:
            visible = visible & (keys <= pos)
            if sliding_window is not None:
                visible = visible & (keys > pos - sliding_window)
        elif sliding_window is not None:
            visible = visible & ((keys - pos).abs() < sliding_window)
        mask = visible[:, None].expand(n, group, c, mk).reshape(n, 1, group * c, mk)
        res = F.scaled_dot_product_attention(qh[:, :, :, i0:i0 + c].reshape(n, hk, group * c, d),
                                             kh, vh, attn_mask=mask, scale=scale)
        # Rows that see no key (padding, or before the first key) are zeros, not softmax's NaN.
        res = res.masked_fill(~mask.any(dim=-1, keepdim=True), 0)
        out[:, :, :, i0:i0 + c] = res.view(n, hk, group, c, d)
    return out.permute(0, 3, 1, 2, 4).reshape(n, mq, hq, d)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] along dim 0 for an index of any shape; index_select copies whole rows, several
    times faster than advanced indexing on CPU."""
    return x.index_select(0, index.reshape(-1)).view(*index.shape, *x.shape[1:])


def token_index(starts: list[int], lens: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, max(lens)] flat indices starts[b] + i (clamped inside the sequence) and validity."""
    pos = torch.arange(max(lens), device=device)[None, :]
    start = torch.tensor(starts, device=device)[:, None]
    length = torch.tensor(lens, device=device)[:, None]
    return start + torch.minimum(pos, length - 1), pos < length


@register_op
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                    causal: bool, scale: float | None = None,
                    sliding_window: int | None = None) -> torch.Tensor:
    """q[T,Hq,D], k/v[Tk,Hk,D], cu_seqlens_q/k[B+1] int32 -> out[T,Hq,D] (see module doc)."""
    cu_q, cu_k = check_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                            scale, sliding_window)
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else float(scale)
    q_lens = [b - a for a, b in zip(cu_q, cu_q[1:])]
    k_lens = [b - a for a, b in zip(cu_k, cu_k[1:])]
    out = torch.zeros_like(q)
    for group in sequence_groups(q_lens, k_lens):
        lq, lk = [q_lens[b] for b in group], [k_lens[b] for b in group]
        q_tok, q_valid = token_index([cu_q[b] for b in group], lq, q.device)
        k_tok, _ = token_index([cu_k[b] for b in group], lk, q.device)
        res = attention_padded(gather_rows(q, q_tok), gather_rows(k, k_tok), gather_rows(v, k_tok),
                               torch.tensor(lq, device=q.device),
                               torch.tensor(lk, device=q.device), causal, scale, sliding_window)
        out.index_copy_(0, q_tok[q_valid], res[q_valid].to(q.dtype))
    return out


# Head dims the Triton kernel has launch configurations for (80 and 96 pad to 128, never 256).
TRITON_HEAD_DIMS = (64, 80, 96, 128, 256)


def triton_supports(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                    scale=None, sliding_window=None):
    """Head dims the Triton kernels are built for; anything else falls back to eager. It runs on
    every call, so it reads one shape and spells out the op's parameters (binding them costs
    less than packing *args)."""
    try:
        _, _, head_dim = q.shape
    except (AttributeError, TypeError, ValueError):
        return True   # not a 3-d tensor: the launcher's argument check names the problem
    if head_dim not in TRITON_HEAD_DIMS:
        return (f"head_dim {head_dim} not supported by the triton kernel "
                f"({', '.join(map(str, TRITON_HEAD_DIMS))})")
    return True


def _cu(lens: list[int], device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32,
                        device=device)


@flash_attention.set_sample_inputs
def sample_inputs(device="cpu", dtype=torch.float32) -> list[SampleInput]:
    g = torch.Generator().manual_seed(0)
    samples = []
    # (name, q lens, k lens, Hq, Hk, D, causal, sliding_window)
    for name, lq, lk, hq, hk, d, causal, window in [
        ("causal_gqa2_d80", [1, 16, 37], [1, 16, 37], 4, 2, 80, True, None),
        ("prefix_mqa_d64", [3, 17], [20, 17], 7, 1, 64, True, None),
        ("window_d80", [37, 9], [37, 12], 2, 2, 80, True, 8),
        ("bidirectional_d64", [5, 19], [5, 19], 4, 1, 64, False, None),
    ]:
        q = randn(sum(lq), hq, d, device=device, dtype=dtype, generator=g)
        k = randn(sum(lk), hk, d, device=device, dtype=dtype, generator=g)
        v = randn(sum(lk), hk, d, device=device, dtype=dtype, generator=g)
        samples.append(SampleInput(name, (q, k, v, _cu(lq, device), _cu(lk, device), max(lq),
                                          max(lk), causal), {"sliding_window": window}))
    return samples


def load_triton():
    """The Triton launcher (imports triton: runs on the first call that selects it)."""
    from ..triton_kernels.flash_attention import flash_attention as launcher
    return launcher


register_triton(flash_attention, load_triton, supports=triton_supports)
