"""Batched generation of a fixed set of sequences (continuous batching is the scheduler's job).

Each step either prefills or decodes:
    prefill  every admitted sequence with prompt tokens left contributes them, packed into
             forwards of at most max_num_batched_tokens tokens (a prompt that does not fit is
             split: chunked prefill); sequences whose prompt completes sample their first token
    decode   every running sequence contributes its last sampled token, all in one forward (or
             several, if they outnumber max_num_batched_tokens)
Sequences are admitted in order while fewer than max_num_seqs run and the cache has free blocks
for prompt + max_tokens (capped at max_model_len): reserving up front means a running sequence
never runs out of blocks, so nothing needs preempting. Finished sequences free their blocks.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterator

from .kv_cache import BlockAllocator, blocks_needed
from .model_runner import ModelRunner
from .sampling import SamplerOutput, sample
from .sequence import Sequence


class BatchGenerator:
    def __init__(self, runner: ModelRunner, allocator: BlockAllocator, *, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, eos_token_ids: set[int],
                 detokenize: Callable[[list[int], bool], str] | None):
        self.runner, self.allocator = runner, allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.detokenize = detokenize

    def max_total_tokens(self, seq: Sequence) -> int:
        limit = seq.params.max_tokens
        total = self.max_model_len if limit is None else seq.num_prompt_tokens + limit
        return min(total, self.max_model_len)

    def run(self, seqs: list[Sequence]) -> None:
        """Generate until every sequence has finished (results are left in the sequences)."""
        waiting, running = deque(seqs), []
        try:
            while waiting or running:
                self._admit(waiting, running)
                self._step([s for s in running if s.in_prefill] or running)
                for seq in (s for s in running if s.finished):
                    self.allocator.free(seq.block_table)
                    seq.block_table = []
                running = [s for s in running if not s.finished]
        finally:   # an interrupted run must not leak blocks
            for seq in running:
                self.allocator.free(seq.block_table)
                seq.block_table = []

    def _admit(self, waiting: deque, running: list) -> None:
        bs = self.runner.block_size
        while waiting and len(running) < self.max_num_seqs:
            need = blocks_needed(self.max_total_tokens(waiting[0]), bs)
            if need > self.allocator.num_free_blocks:
                if not running:
                    raise RuntimeError(f"the KV cache ({self.allocator.num_blocks} blocks) cannot "
                                       f"hold one sequence of {need} blocks")
                return
            seq = waiting.popleft()
            seq.block_table = self.allocator.allocate(need)
            running.append(seq)

    def _pack(self, seqs: list[Sequence]) -> Iterator[tuple[list[Sequence], list[int]]]:
        """Forwards of at most max_num_batched_tokens tokens covering every pending token."""
        batch, counts, room = [], [], self.max_num_batched_tokens
        for seq in seqs:
            pending = seq.num_pending_tokens
            while pending:
                n = min(pending, room)
                batch.append(seq)
                counts.append(n)
                pending, room = pending - n, room - n
                if room == 0:
                    yield batch, counts
                    batch, counts, room = [], [], self.max_num_batched_tokens
        if batch:
            yield batch, counts

    def _step(self, seqs: list[Sequence]) -> None:
        for batch, counts in self._pack(seqs):
            logits = self.runner.execute(batch, counts)
            for seq, n in zip(batch, counts):
                seq.num_computed_tokens += n
            ready = [i for i, seq in enumerate(batch) if seq.num_pending_tokens == 0]
            if not ready:
                continue
            out = sample(logits[ready], [batch[i].params for i in ready], [batch[i].generator for i in ready])
            for row, i in enumerate(ready):
                self._append(batch[i], out, row)

    def _append(self, seq: Sequence, out: SamplerOutput, row: int) -> None:
        token, params = out.token_ids[row], seq.params
        seq.token_ids.append(token)
        seq.cumulative_logprob += out.logprobs[row]
        if params.logprobs is not None:
            n = params.logprobs
            top = (out.top_ids[row][:n], out.top_logprobs[row][:n]) if n else ([], [])
            seq.step_logprobs.append((out.logprobs[row], out.ranks[row], *top))
        if token in self.eos_token_ids and not params.ignore_eos:
            seq.finish_reason = "stop"
        elif token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif params.stop and self._hit_stop_string(seq):
            seq.finish_reason = "stop"
        elif len(seq.token_ids) >= self.max_total_tokens(seq):
            seq.finish_reason = "length"

    def _hit_stop_string(self, seq: Sequence) -> bool:
        """Cut the text before the earliest stop string, if one appeared."""
        text = self.detokenize(seq.output_token_ids, seq.params.skip_special_tokens)
        hits = [(text.find(s), s) for s in seq.params.stop if s in text]
        if not hits:
            return False
        index, stop = min(hits)
        seq.text, seq.stop_reason = text[:index], stop
        return True
