"""The model runner: one step of the engine core -> one forward over a flattened token batch,
then sampling.

It knows nothing about scheduling. The scheduler decides which sequences run and how many of
their pending tokens each contributes; the runner keeps every running sequence in its persistent
batch (input_batch.py), builds input ids, positions and attention metadata from it, runs the
model under the engine's kernel choices and samples the sequences whose tokens are all computed:

    result = runner.execute_model(step_input)            # tokens, logprobs, prompt logprobs

Sequence b contributes token_ids[c_b : c_b + n_b] (c_b = num_computed_tokens) at positions
c_b .. c_b + n_b - 1, written to slots of its block table. The caller advances num_computed_tokens.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch

import lepton_kernels as lk

from lepton.engine.sampler import compute_logprobs, sample_batch
from lepton.model_executor.input_batch import InputBatch
from lepton.model_executor.kv_cache import KVCache
from lepton.model_executor.host_to_device import HostToDevice
from lepton.model_executor.layers.attention import AttentionMetadata
from lepton.model_executor.layers.attention_metadata import plan_attention_metadata
from lepton.model_executor.step import StepInput, StepResult


class StepArrays(NamedTuple):
    """One forward's inputs on the host, decodes first (see ModelRunner._plan); what a
    tensor-parallel driver broadcasts to its workers (parallel/messages.py)."""

    query_lens: np.ndarray     # [B] int64, new tokens per sequence
    seq_lens: np.ndarray       # [B] int64, context + new tokens
    block_tables: np.ndarray   # [B, W] int32
    slot_mapping: np.ndarray   # [T] int64
    input_ids: np.ndarray      # [T] int64
    positions: np.ndarray      # [T] int64
    logit_rows: np.ndarray     # [R] int64, rows of the hidden states the LM head reads


class ModelRunner:
    # Tensor parallel driver: called with each step's inputs and block copies before its forward,
    # so the workers can run the same forward (parallel/executor.py); None otherwise.
    on_step: Callable[[StepArrays, list[tuple[int, int]]], None] | None = None

    def __init__(self, model: torch.nn.Module, device: torch.device, kernels: dict[str, str] | None = None,
                 seed: int = 0):
        self.model = model
        self.device = device
        self.kernels = dict(kernels or {})
        self.kv_cache: KVCache | None = None
        self.input_batch: InputBatch | None = None
        # The stream of the rows without a seed of their own.
        self.generator = torch.Generator(device=device).manual_seed(seed)

    # ---- cache ----------------------------------------------------------------------------
    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype,
                          max_model_len: int | None = None, max_num_seqs: int = 1) -> KVCache:
        """The KV cache, and the persistent batch that will index it."""
        m = self.model
        self.input_batch = InputBatch(max_num_seqs, max_model_len or num_blocks * block_size, block_size)
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
    @torch.inference_mode()
    def execute_model(self, step: StepInput, eos_token_ids: torch.Tensor | None = None) -> StepResult:
        """One step of the engine core: the persistent batch follows the sequences that joined
        and left, the forward runs over its rows, and the sampler draws from its parameters.
        Every input of the step (tokens, positions, attention metadata, logits rows, sampling
        parameters) reaches the device in one copy."""
        batch = self.input_batch
        for seq_id in step.finished_seq_ids:
            batch.remove(seq_id)
        self.copy_blocks(step.block_copies)
        seqs = step.seqs
        rows = batch.rows(seqs)
        batch.sync_block_tables(seqs, rows, force=bool(step.block_copies))
        counts = np.array(step.num_new_tokens, dtype=np.int64)
        start = np.fromiter((s.num_computed_tokens for s in seqs), np.int64, len(seqs))
        up = HostToDevice(self.device)
        arrays = self._plan(
            counts, start, lambda seq_of, pos: batch.token_ids[rows[seq_of], pos],
            lambda order: batch.block_table[rows[order], :int(batch.num_blocks[rows].max())],
            [r.row for r in step.prompt_logprobs])
        if self.on_step is not None:
            self.on_step(arrays, step.block_copies)
        inputs = self._stage(arrays, up)
        sampling = None
        if step.sample_seqs:
            index = step.sample_rows
            every_row = index == list(range(len(seqs)))   # no fork and every sequence samples
            # Forked samples join the batch here.
            sample_rows = rows if every_row else batch.rows(step.sample_seqs)
            sampling = batch.plan_sampling_metadata(sample_rows, up)
            grammar = step.token_bitmask and tuple(up.add(a) for a in step.token_bitmask)
            # The logits of the sampled rows, in sampling order, when that is not simply all rows.
            gather = None if every_row else up.add(np.array(index, dtype=np.int64))
        up.upload()
        logits, full = self._run(*inputs(), counts, [r.row for r in step.prompt_logprobs])
        prompt_stats = [compute_logprobs(full[r.row][r.offset:r.offset + len(r.token_ids)],
                                         torch.tensor(r.token_ids), r.num_top) for r in step.prompt_logprobs]
        if sampling is None:
            return StepResult([], [], [], [], [], [], prompt_stats)
        if gather is not None:
            logits = logits.index_select(0, up.get(gather))
        md = sampling()
        if grammar:
            md.token_bitmask = tuple(up.get(h) for h in grammar)
        out = sample_batch(logits, md, self.generator, eos_token_ids)
        finite = np.array(out.finite, dtype=bool)
        batch.append_tokens(sample_rows[finite], np.array(out.token_ids, dtype=np.int64)[finite])
        return StepResult(out.token_ids, out.logprobs, out.ranks, out.top_ids, out.top_logprobs, out.finite,
                          prompt_stats)

    @torch.inference_mode()
    def execute_arrays(self, arrays: StepArrays, block_copies: list[tuple[int, int]]) -> None:
        """A tensor-parallel worker's step: the driver's inputs, the same forward and LM head (its
        all-reduces and the logits gather pair with the driver's); nothing is sampled here."""
        self.copy_blocks(block_copies)
        up = HostToDevice(self.device)
        inputs = self._stage(arrays, up)
        up.upload()
        input_ids, positions, meta, logit_rows = inputs()
        with lk.engine_kernels(self.kernels):
            hidden = self.model(input_ids, positions, meta)
            self.model.compute_logits(hidden[logit_rows])

    def _prepare(self, counts: np.ndarray, start: np.ndarray, gather_tokens, gather_tables, full: list[int],
                 up: HostToDevice):
        """_plan, then _stage into ``up``."""
        return self._stage(self._plan(counts, start, gather_tokens, gather_tables, full), up)

    def _stage(self, arrays: StepArrays, up: HostToDevice):
        """Put the step's inputs into ``up``; returns a function that, after the upload, gives
        (input_ids[T], positions[T], metadata, logits rows)."""
        meta = plan_attention_metadata(arrays.query_lens, arrays.seq_lens, arrays.block_tables,
                                       arrays.slot_mapping, self.block_size, up)
        handles = [up.add(arrays.input_ids), up.add(arrays.positions), up.add(arrays.logit_rows)]
        return lambda: (up.get(handles[0]), up.get(handles[1]), meta(), up.get(handles[2]))

    def _plan(self, counts: np.ndarray, start: np.ndarray, gather_tokens, gather_tables, full: list[int]
              ) -> StepArrays:
        """The step's model inputs, on the host. Sequence b adds counts[b]
        tokens after start[b] computed ones; gather_tokens(seq_of, positions) reads tokens,
        gather_tables(order) the block tables of the sequences in that order. The logits rows
        are each sequence's last token, then every token of the sequences in ``full`` (prompt
        logprobs), in the caller's order. Decodes (one new token after a cached context) run
        first, the other sequences keep their order after them (a stable partition: the
        attention metadata sends the leading decodes to the decode kernel and the rest to the
        prefill kernel). Built with numpy on the host: each torch op costs microseconds."""
        bs, num_seqs = self.block_size, len(counts)
        order = np.argsort(~((counts == 1) & (start > 0)), kind="stable")
        counts_o, start_o = counts[order], start[order]
        cu = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(counts_o, out=cu[1:])
        # Token t belongs to sequence seq_of[t]; its position is its offset in the step + c_b.
        seq_of = np.repeat(np.arange(num_seqs), counts_o)
        positions = np.arange(int(cu[-1])) - cu[:-1][seq_of] + start_o[seq_of]
        block_tables = gather_tables(order)
        slot_mapping = block_tables[seq_of, positions // bs].astype(np.int64) * bs + positions % bs
        first = np.empty(num_seqs, dtype=np.int64)
        first[order] = cu[:-1]
        logit_rows = np.concatenate([first + counts - 1] + [np.arange(first[b], first[b] + counts[b]) for b in full])
        input_ids = np.asarray(gather_tokens(order[seq_of], positions), dtype=np.int64)
        return StepArrays(counts_o, start_o + counts_o, block_tables, slot_mapping, input_ids, positions, logit_rows)

    def _run(self, input_ids, positions, meta, logit_rows, counts: np.ndarray, full: list[int]
             ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The forward, then one lm_head call over the logits rows (see _prepare)."""
        with lk.engine_kernels(self.kernels):
            hidden = self.model(input_ids, positions, meta)
            logits = self.model.compute_logits(hidden[logit_rows]).float()
        extra, at = {}, len(counts)
        for b in full:
            extra[b] = logits[at:at + int(counts[b])]
            at += int(counts[b])
        return logits[:len(counts)], extra

    @torch.inference_mode()
    def forward_step(self, seqs: list, num_new_tokens: list[int], all_logits: list[bool] | None = None
                     ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The forward alone, for sequences outside the persistent batch (tests, scoring):
        (logits[B, V] after each sequence's last new token, {b: logits[n_b, V] after every new
        token of sequence b} for the b with all_logits[b]), float32."""
        if not seqs or len(seqs) != len(num_new_tokens) or min(num_new_tokens) < 1:
            raise ValueError("forward_step needs one or more sequences, each with at least one new token")
        counts = np.array(num_new_tokens, dtype=np.int64)
        start = np.array([s.num_computed_tokens for s in seqs], dtype=np.int64)
        width = max(len(s.block_table) for s in seqs)
        tables = np.array([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], dtype=np.int32)
        full = [b for b, flag in enumerate(all_logits or ()) if flag]
        up = HostToDevice(self.device)
        inputs = self._prepare(
            counts, start, lambda seq_of, pos: np.array([seqs[b].token_ids[p] for b, p in zip(seq_of, pos)]),
            lambda order: tables[order], full, up)
        up.upload()
        return self._run(*inputs(), counts, full)

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
