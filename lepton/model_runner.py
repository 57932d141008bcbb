"""The model runner: turns a batch of sequences into one forward over a flattened token batch.

It knows nothing about scheduling. A scheduler (or the fixed-batch loop in generation.py) decides
which sequences run and how many of their pending tokens each contributes; the runner builds
input ids, positions and attention metadata, runs the model under the engine's kernel choices and
returns the next-token logits of each sequence:

    logits = runner.execute(seqs, num_new_tokens)        # [B, V] float32

Sequence b contributes token_ids[c_b : c_b + n_b] (c_b = num_computed_tokens) at positions
c_b .. c_b + n_b - 1, written to slots of its block table. The caller advances num_computed_tokens.
"""

from __future__ import annotations

import torch

import lepton_kernels as lk

from .kv_cache import KVCache
from .layers.attention import AttentionMetadata


def _cu_seqlens(lens: torch.Tensor) -> torch.Tensor:
    cu = torch.zeros(lens.numel() + 1, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    return cu


class ModelRunner:
    def __init__(self, model: torch.nn.Module, device: torch.device, kernels: dict[str, str] | None = None):
        self.model = model
        self.device = device
        self.kernels = dict(kernels or {})
        self.kv_cache: KVCache | None = None

    # ---- cache ----------------------------------------------------------------------------
    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype) -> KVCache:
        m = self.model
        self.kv_cache = KVCache(m.num_layers, num_blocks, block_size, m.num_kv_heads, m.head_dim,
                                dtype, self.device)
        self.kv_cache.bind(list(m.attention_layers()))
        return self.kv_cache

    @property
    def block_size(self) -> int:
        if self.kv_cache is None:
            raise RuntimeError("allocate_kv_cache() first")
        return self.kv_cache.block_size

    # ---- generation step ------------------------------------------------------------------
    def prepare(self, seqs: list, num_new_tokens: list[int]
                ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """input_ids[T], positions[T] and the metadata of one step (tensors on the device)."""
        starts = [s.num_computed_tokens for s in seqs]
        tokens = [t for s, c, n in zip(seqs, starts, num_new_tokens) for t in s.token_ids[c:c + n]]
        counts = torch.tensor(num_new_tokens, dtype=torch.int64)
        seq_lens = torch.tensor(starts, dtype=torch.int64) + counts
        cu = _cu_seqlens(counts)
        # Token t belongs to sequence seq_of[t]; its position is its offset in the step + c_b.
        seq_of = torch.repeat_interleave(torch.arange(len(seqs)), counts)
        positions = torch.arange(len(tokens)) - cu[:-1].long()[seq_of] + (seq_lens - counts)[seq_of]
        bs = self.block_size
        width = max(len(s.block_table) for s in seqs)
        block_tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs],
                                    dtype=torch.int32)
        slot_mapping = block_tables[seq_of, positions // bs].long() * bs + positions % bs
        dev = self.device
        meta = AttentionMetadata(
            cu_seqlens_q=cu.to(dev), max_seqlen_q=max(num_new_tokens),
            seq_lens=seq_lens.to(torch.int32).to(dev), max_seqlen_k=int(seq_lens.max()),
            block_tables=block_tables.to(dev), slot_mapping=slot_mapping.to(dev),
            fresh_prefill=all(c == 0 for c in starts))
        return torch.tensor(tokens, dtype=torch.int64, device=dev), positions.to(dev), meta

    @torch.inference_mode()
    def execute(self, seqs: list, num_new_tokens: list[int]) -> torch.Tensor:
        """Run n_b new tokens of every sequence; logits[B, V] (float32) after each one's last token."""
        if not seqs or len(seqs) != len(num_new_tokens) or min(num_new_tokens) < 1:
            raise ValueError("execute needs one or more sequences, each with at least one new token")
        input_ids, positions, meta = self.prepare(seqs, num_new_tokens)
        with lk.engine_kernels(self.kernels):
            hidden = self.model(input_ids, positions, meta)
            return self.model.compute_logits(hidden[meta.cu_seqlens_q[1:].long() - 1]).float()

    # ---- cache-free forward (scoring, embeddings, classification) ----------------------------
    @torch.inference_mode()
    def encode(self, token_ids: list[list[int]], token_type_ids: list[list[int]] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole sequences, nothing cached -> (hidden[T, H], cu_seqlens[B+1] int32, on the device)."""
        lens = [len(t) for t in token_ids]
        meta = AttentionMetadata.for_prefill(lens, self.device)
        input_ids = torch.tensor([t for ids in token_ids for t in ids], dtype=torch.int64, device=self.device)
        positions = torch.cat([torch.arange(n) for n in lens]).to(self.device)
        kwargs = {}
        if getattr(self.model, "is_encoder", False) and token_type_ids is not None:
            kwargs["token_type_ids"] = torch.tensor([t for ids in token_type_ids for t in ids],
                                                    dtype=torch.int64, device=self.device)
        with lk.engine_kernels(self.kernels):
            hidden = self.model(input_ids, positions, meta, **kwargs)
        return hidden, meta.cu_seqlens_q

    @torch.inference_mode()
    def profile_peak_memory(self, num_tokens: int, max_len: int, num_logits: int,
                            consume_logits=None) -> int:
        """GPU: peak bytes torch allocates for weights + a forward of ``num_tokens`` dummy tokens
        (sequences of at most ``max_len``) + logits of ``num_logits`` rows, passed to
        ``consume_logits`` (the sampler, whose [B, V] temporaries count too) when given."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        lens = [max_len] * (num_tokens // max_len) + ([num_tokens % max_len] if num_tokens % max_len else [])
        hidden, _ = self.encode([[0] * n for n in lens])
        if hasattr(self.model, "compute_logits"):
            rows = hidden[torch.arange(num_logits, device=hidden.device) % hidden.shape[0]]
            logits = self.model.compute_logits(rows)
            if consume_logits is not None:
                consume_logits(logits)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del hidden
        torch.cuda.empty_cache()
        return peak
