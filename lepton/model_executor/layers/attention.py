"""Attention over a flattened batch (no padding), with or without the paged KV cache.

One forward of the model runner carries one :class:`AttentionMetadata` (attention_metadata.py)
shared by all layers. The layer first writes the step's new K/V to its cache (slot_mapping), then:
    fresh prefill (nothing cached before this step), or no cache bound (encoders, scoring):
        flash_attention over the new K/V
    metadata with the decode / prefill split (build_attention_metadata):
        decodes (query_len 1, leading tokens)  -> paged_attention, the decode-tuned kernel
        prefills (the remaining tokens)        -> flash_attention (varlen), over the new K/V, or
            over each prefill's whole K/V gathered from the cache when some prefill has context
    metadata without the split (built by hand): paged_attention over the whole step
Encoders pass ``causal=False`` and no cache.
"""

from __future__ import annotations

import torch
from torch import nn

import lepton_kernels as lk

from lepton.model_executor.layers.attention_metadata import AttentionMetadata, build_attention_metadata

__all__ = ["Attention", "AttentionMetadata", "build_attention_metadata"]


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
        if meta.num_decodes is None:
            return lk.paged_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.seq_lens,
                                      meta.cu_seqlens_q, meta.max_seqlen_q, meta.max_seqlen_k, self.scale,
                                      self.sliding_window)
        n = meta.num_decode_tokens
        if n == q.shape[0]:
            return self._decode(q, meta)
        prefill = self._prefill(q[n:], k[n:], v[n:], meta)
        # Both halves write fresh tensors; one concatenation puts them back in token order.
        return prefill if n == 0 else torch.cat([self._decode(q[:n], meta), prefill])

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The decode part: one query per sequence, at its last position, against the cache."""
        return lk.paged_attention(q, self.k_cache, self.v_cache, meta.decode_block_tables,
                                  meta.decode_seq_lens, meta.decode_cu_seqlens_q, 1,
                                  meta.decode_max_seqlen_k, self.scale, self.sliding_window)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        """The prefill part: varlen flash_attention with bottom-right causal alignment. Queries
        of a prefill with context must see its cached tokens too, so then every prefill's K/V is
        read back from the cache (where reshape_and_cache just put the new tokens as well) with
        one index_select per tensor over the flattened slots."""
        if meta.prefill_has_context:
            # flatten(0, 1) is a view for the contiguous per-layer caches: no copy of the cache.
            k = self.k_cache.flatten(0, 1).index_select(0, meta.prefill_kv_slots)
            v = self.v_cache.flatten(0, 1).index_select(0, meta.prefill_kv_slots)
        return lk.flash_attention(q, k, v, meta.prefill_cu_seqlens_q, meta.prefill_cu_seqlens_k,
                                  meta.prefill_max_seqlen_q, meta.prefill_max_seqlen_k, self.causal,
                                  self.scale, self.sliding_window)
