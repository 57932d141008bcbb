"""What the attention layers of one forward need to know about the step, built once per step.

A step's sequences are flattened into T tokens; sequence b contributes query_lens[b] new tokens
and has seq_lens[b] = context_b + query_lens[b] tokens once they are cached, the token at position
p in slot block_tables[b, p // block_size] * block_size + p % block_size. Its new tokens are its
last positions context_b .. seq_lens[b] - 1 and attend causally to all seq_lens[b] tokens.

The step splits into two parts, each with its own kernel (Attention.forward routes them):
    decodes   the leading num_decodes sequences with query_len 1 and context > 0: one query each,
              tokens 0 .. num_decodes - 1, read from the paged cache by paged_attention
    prefills  the rest (fresh prompts, chunks of a long prompt, prompts after a cached prefix,
              single-token prompts): flash_attention over their K/V. Without context anywhere
              that is the step's new K/V; otherwise every prefill's whole K/V (context + new,
              already in the cache) is gathered into one contiguous [Tk, Hk, D] tensor through
              prefill_kv_slots, the slots of positions 0 .. seq_lens[b] - 1 of each prefill b,
              and cu_seqlens_k = cumsum(seq_lens[prefills]) (bottom-right causal alignment).
The model runner orders sequences decodes first; a decode-shaped sequence after the first prefill
is simply run as a one-token prefill (correct, only slower), so the split never depends on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from lepton.model_executor.host_to_device import HostToDevice


@dataclass
class AttentionMetadata:
    cu_seqlens_q: torch.Tensor             # [B+1] int32
    max_seqlen_q: int
    seq_lens: torch.Tensor | None = None   # [B] int32, None when nothing is cached
    max_seqlen_k: int = 0
    block_tables: torch.Tensor | None = None   # [B, max_blocks] int32
    slot_mapping: torch.Tensor | None = None   # [T] int64
    fresh_prefill: bool = True             # every sequence starts at position 0 in this step
    # The decode / prefill split (build_attention_metadata). num_decodes None means no split
    # information: every step with a cache goes through paged_attention as a whole.
    num_decodes: int | None = None
    decode_seq_lens: torch.Tensor | None = None        # [num_decodes] int32 (view of seq_lens)
    decode_block_tables: torch.Tensor | None = None    # [num_decodes, max_blocks] int32
    decode_cu_seqlens_q: torch.Tensor | None = None    # [num_decodes+1] int32, 0 .. num_decodes
    decode_max_seqlen_k: int = 0
    prefill_cu_seqlens_q: torch.Tensor | None = None   # [P+1] int32, from the first prefill token
    # [P+1] int32 over the gathered K/V; the same tensor as prefill_cu_seqlens_q without context
    prefill_cu_seqlens_k: torch.Tensor | None = None
    prefill_max_seqlen_q: int = 0
    prefill_max_seqlen_k: int = 0
    prefill_has_context: bool = False                  # some prefill has cached tokens before it
    prefill_kv_slots: torch.Tensor | None = None       # [Tk] int64, only with context

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens_q.numel() - 1

    @property
    def num_decode_tokens(self) -> int:
        """Tokens of the decode part (one per decode); the prefill part starts here."""
        return self.num_decodes or 0

    @classmethod
    def for_prefill(cls, seq_lens: list[int], device: torch.device | str = "cpu") -> "AttentionMetadata":
        """Metadata of a cache-free forward over whole sequences (encoders, scoring)."""
        cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(seq_lens, dtype=torch.int32).cumsum(0)
        return cls(cu_seqlens_q=cu.to(device), max_seqlen_q=max(seq_lens), max_seqlen_k=max(seq_lens))


def _cumsum0(lens: np.ndarray) -> np.ndarray:
    """[0, l0, l0 + l1, ...] as int32: cu_seqlens."""
    cu = np.zeros(len(lens) + 1, dtype=np.int32)
    np.cumsum(lens, out=cu[1:])
    return cu


def _kv_slots(block_tables: np.ndarray, k_lens: np.ndarray, block_size: int) -> np.ndarray:
    """Slots of positions 0 .. k_lens[b] - 1 of every sequence b, sequence after sequence.
    Built per block (whole blocks of consecutive slots, then each last block cut to its
    sequence's length): indexing the table once per block instead of once per token is several
    times faster at long contexts."""
    n_blocks = -(-k_lens // block_size)
    owner = np.repeat(np.arange(len(k_lens)), n_blocks)
    first = _cumsum0(n_blocks)
    # index: each block's number within its own sequence (its table column)
    index = np.arange(first[-1]) - np.repeat(first[:-1], n_blocks).astype(np.int64)
    offset = np.arange(block_size)
    slots = block_tables[owner, index].astype(np.int64)[:, None] * block_size + offset  # [blocks, BS]
    keep = (index * block_size)[:, None] + offset < np.repeat(k_lens, n_blocks)[:, None]
    return slots[keep]


def build_attention_metadata(query_lens: np.ndarray, seq_lens: np.ndarray, block_tables: np.ndarray,
                             slot_mapping: np.ndarray, block_size: int, device) -> AttentionMetadata:
    """The metadata of one step with the decode / prefill split (module doc), from host arrays:
    query_lens[B] and seq_lens[B] (int), block_tables[B, M] (int32), slot_mapping[T] (int64).
    Vectorized numpy (no loop over sequences) and one host-to-device copy."""
    up = HostToDevice(device)
    finish = plan_attention_metadata(query_lens, seq_lens, block_tables, slot_mapping, block_size, up)
    up.upload()
    return finish()


def plan_attention_metadata(query_lens: np.ndarray, seq_lens: np.ndarray, block_tables: np.ndarray,
                            slot_mapping: np.ndarray, block_size: int, up: HostToDevice
                            ) -> Callable[[], AttentionMetadata]:
    """build_attention_metadata in two halves, so a step's other inputs share its one copy:
    the host arrays go into ``up`` now, and the returned function builds the metadata from
    their device views once ``up.upload()`` ran."""
    query_lens = np.asarray(query_lens, dtype=np.int64)
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    block_tables = np.ascontiguousarray(block_tables, dtype=np.int32)
    num_seqs = len(query_lens)
    if num_seqs == 0 or seq_lens.shape != (num_seqs,) or block_tables.shape[0] != num_seqs:
        raise ValueError(f"query_lens, seq_lens and block_tables must describe the same B >= 1 "
                         f"sequences, got {query_lens.shape}, {seq_lens.shape}, {block_tables.shape}")
    if query_lens.min() < 1 or (seq_lens < query_lens).any():
        raise ValueError("every sequence needs query_len >= 1 and seq_len >= query_len")
    cu_q = _cumsum0(query_lens)
    context = seq_lens - query_lens
    is_decode = (query_lens == 1) & (context > 0)
    # argmin of a bool array is the first False: the length of the leading run of decodes.
    num_decodes = num_seqs if is_decode.all() else int(np.argmin(is_decode))
    pre = slice(num_decodes, None)
    has_context = bool((context[pre] > 0).any())

    handles = [up.add(a) for a in (cu_q, seq_lens.astype(np.int32), block_tables,
                                   np.asarray(slot_mapping, dtype=np.int64))]
    if num_decodes < num_seqs:
        handles.append(up.add(cu_q[pre] - cu_q[num_decodes]))
        if has_context:
            k_lens = seq_lens[pre]
            handles.append(up.add(_cumsum0(k_lens)))
            handles.append(up.add(_kv_slots(block_tables[pre], k_lens, block_size)))
    return lambda: _finish(query_lens, seq_lens, context, num_decodes, has_context, [up.get(h) for h in handles])


def _finish(query_lens, seq_lens, context, num_decodes: int, has_context: bool, t: list[torch.Tensor]
            ) -> AttentionMetadata:
    num_seqs, pre = len(query_lens), slice(num_decodes, None)
    cu_q_t, seq_lens_t, tables_t, slots_t = t[:4]
    meta = AttentionMetadata(
        cu_seqlens_q=cu_q_t, max_seqlen_q=int(query_lens.max()), seq_lens=seq_lens_t,
        max_seqlen_k=int(seq_lens.max()), block_tables=tables_t, slot_mapping=slots_t,
        fresh_prefill=not context.any(), num_decodes=num_decodes, prefill_has_context=has_context)
    if num_decodes:
        meta.decode_seq_lens = seq_lens_t[:num_decodes]
        meta.decode_block_tables = tables_t[:num_decodes]
        # Decodes are one token each, so their cu_seqlens are the head of the step's.
        meta.decode_cu_seqlens_q = cu_q_t[:num_decodes + 1]
        meta.decode_max_seqlen_k = int(seq_lens[:num_decodes].max())
    if num_decodes < num_seqs:
        meta.prefill_cu_seqlens_q = t[4]
        meta.prefill_cu_seqlens_k = t[5] if has_context else t[4]
        meta.prefill_max_seqlen_q = int(query_lens[pre].max())
        meta.prefill_max_seqlen_k = int(seq_lens[pre].max()) if has_context else meta.prefill_max_seqlen_q
        if has_context:
            meta.prefill_kv_slots = t[6]
    return meta
