"""The model runner: turns a batch of sequences into one forward over a flattened token batch.

It knows nothing about scheduling. The scheduler decides
which sequences run and how many of their pending tokens each contributes; the runner builds
input ids, positions and attention metadata, runs the model under the engine's kernel choices and
returns the next-token logits of each sequence:

    logits = runner.execute(seqs, num_new_tokens)        # [B, V] float32

Sequence b contributes token_ids[c_b : c_b + n_b] (c_b = num_computed_tokens) at positions
c_b .. c_b + n_b - 1, written to slots of its block table. The caller advances num_computed_tokens.
"""

from __future__ import annotations

import numpy as np
import torch

import lepton_kernels as lk

from lepton.model_executor.kv_cache import KVCache
from lepton.model_executor.layers.attention import AttentionMetadata, build_attention_metadata


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
                ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, np.ndarray]:
        """input_ids[T], positions[T], the metadata of one step (tensors on the device) and
        first[B], where each caller's sequence b starts in the flattened batch.
        Decodes (one new token after a cached context) run first, the other sequences keep
        their order after them (a stable partition: build_attention_metadata sends the leading
        decodes to the decode kernel and the rest to the prefill kernel).
        Built with numpy on the host (each torch op costs microseconds of dispatch; this runs
        every step for every running sequence) and moved to the device once."""
        bs, num_seqs = self.block_size, len(seqs)
        counts = np.array(num_new_tokens, dtype=np.int64)
        start = np.array([s.num_computed_tokens for s in seqs], dtype=np.int64)
        order = np.argsort(~((counts == 1) & (start > 0)), kind="stable")
        seqs, counts, start = [seqs[i] for i in order], counts[order], start[order]
        starts = start.tolist()
        if num_seqs == counts.sum():   # decode only: one token each
            tokens = [s.token_ids[c] for s, c in zip(seqs, starts)]
        else:
            tokens = [t for s, c, n in zip(seqs, starts, counts.tolist()) for t in s.token_ids[c:c + n]]
        seq_lens = start + counts
        cu = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(counts, out=cu[1:])
        # Token t belongs to sequence seq_of[t]; its position is its offset in the step + c_b.
        seq_of = np.repeat(np.arange(num_seqs), counts)
        positions = np.arange(len(tokens)) - cu[:-1][seq_of] + start[seq_of]
        width = max(len(s.block_table) for s in seqs)
        flat: list[int] = []
        for s in seqs:
            flat += s.block_table
            flat += [0] * (width - len(s.block_table))
        block_tables = np.array(flat, dtype=np.int32).reshape(num_seqs, width)
        slot_mapping = block_tables[seq_of, positions // bs].astype(np.int64) * bs + positions % bs
        meta = build_attention_metadata(counts, seq_lens, block_tables, slot_mapping, bs, self.device)
        first = np.empty(num_seqs, dtype=np.int64)
        first[order] = cu[:-1]
        ids = torch.from_numpy(np.array(tokens, dtype=np.int64)).to(self.device)
        return ids, torch.from_numpy(positions).to(self.device), meta, first

    @torch.inference_mode()
    def execute(self, seqs: list, num_new_tokens: list[int]) -> torch.Tensor:
        """Run n_b new tokens of every sequence; logits[B, V] (float32) after each one's last token."""
        return self.forward_step(seqs, num_new_tokens)[0]

    @torch.inference_mode()
    def forward_step(self, seqs: list, num_new_tokens: list[int], all_logits: list[bool] | None = None
                     ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """(logits[B, V] after each sequence's last new token, {b: logits[n_b, V] after every new
        token of sequence b} for the b with all_logits[b]: prompt logprobs), float32."""
        if not seqs or len(seqs) != len(num_new_tokens) or min(num_new_tokens) < 1:
            raise ValueError("execute needs one or more sequences, each with at least one new token")
        input_ids, positions, meta, first = self.prepare(seqs, num_new_tokens)
        counts = np.array(num_new_tokens, dtype=np.int64)
        full = [b for b, flag in enumerate(all_logits or ()) if flag]
        # One lm_head call over the last tokens plus every token of the flagged sequences, rows
        # in the caller's sequence order (prepare ran decodes first).
        rows = np.concatenate([first + counts - 1] + [np.arange(first[b], first[b] + counts[b]) for b in full])
        rows = torch.from_numpy(rows).to(self.device)
        with lk.engine_kernels(self.kernels):
            hidden = self.model(input_ids, positions, meta)
            logits = self.model.compute_logits(hidden[rows]).float()
        extra, start = {}, len(seqs)
        for b in full:
            extra[b] = logits[start:start + num_new_tokens[b]]
            start += num_new_tokens[b]
        return logits[:len(seqs)], extra

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole cache blocks src -> dst in every layer (copy-on-write before a forward)."""
        if not pairs:
            return
        data = self.kv_cache.data
        k_caches, v_caches = [kv[0] for kv in data], [kv[1] for kv in data]
        sources = {src for src, _ in pairs}
        # A block freed and reused within one step can be a source and, later in the list, a
        # destination; a kernel copying all pairs at once might then read it after the write.
        # That case (rare) runs the copies one by one, in the order the scheduler made them.
        batches = [pairs] if not any(dst in sources for _, dst in pairs) else [[p] for p in pairs]
        for batch in batches:
            lk.copy_blocks(k_caches, v_caches, torch.tensor(batch, dtype=torch.int64, device=self.device))

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
