"""Attention over a flattened batch (no padding), with or without the paged KV cache.

One forward of the model runner carries one :class:`AttentionMetadata` shared by all layers:
    cu_seqlens_q[B+1]   where each sequence's new tokens start in the flattened batch
    seq_lens[B]         tokens each sequence has in total after this step (cached + new)
    block_tables[B,M]   the cache blocks of each sequence, in order
    slot_mapping[T]     cache slot of each new token (block * block_size + offset; -1: don't cache)
Prefill of fresh sequences (nothing cached yet) attends over the new K/V directly with
flash_attention; everything else (decode, chunked prefill, prefill after a cached prefix, mixed
batches) reads K/V from the paged cache with paged_attention. Encoders pass ``causal=False`` and
no cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import lepton_kernels as lk


@dataclass
class AttentionMetadata:
    cu_seqlens_q: torch.Tensor             # [B+1] int32
    max_seqlen_q: int
    seq_lens: torch.Tensor | None = None   # [B] int32, None when nothing is cached
    max_seqlen_k: int = 0
    block_tables: torch.Tensor | None = None   # [B, max_blocks] int32
    slot_mapping: torch.Tensor | None = None   # [T] int64
    fresh_prefill: bool = True             # every sequence starts at position 0 in this step

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens_q.numel() - 1

    @classmethod
    def for_prefill(cls, seq_lens: list[int], device: torch.device | str = "cpu") -> "AttentionMetadata":
        """Metadata of a cache-free forward over whole sequences (encoders, scoring)."""
        cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(seq_lens, dtype=torch.int32).cumsum(0)
        return cls(cu_seqlens_q=cu.to(device), max_seqlen_q=max(seq_lens), max_seqlen_k=max(seq_lens))


class Attention(nn.Module):
    """softmax(q k^T * scale + mask) v for q[T,Hq,D], k/v[T,Hk,D]; GQA when Hq > Hk.

    The KV cache of this layer (``k_cache``/``v_cache``, [num_blocks, block_size, Hk, D]) is bound
    by the model runner after it sizes the cache; without it the layer is a plain varlen
    attention (encoders, or a forward that never decodes).
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None,
                 causal: bool = True, sliding_window: int | None = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.causal = causal
        self.sliding_window = sliding_window
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        # q: [T, Hq, D], k/v: [T, Hk, D] -> [T, Hq, D]
        if self.k_cache is not None and meta.slot_mapping is not None:
            lk.reshape_and_cache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        if meta.fresh_prefill or self.k_cache is None:
            return lk.flash_attention(q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_q, meta.max_seqlen_q,
                                      meta.max_seqlen_q, self.causal, self.scale, self.sliding_window)
        return lk.paged_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.seq_lens,
                                  meta.cu_seqlens_q, meta.max_seqlen_q, meta.max_seqlen_k, self.scale,
                                  self.sliding_window)
