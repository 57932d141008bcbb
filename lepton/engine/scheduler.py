"""The scheduler: which sequences run in the next forward, and how many tokens each contributes.

Every step fills a token budget (max_num_batched_tokens) and a sequence cap (max_num_seqs):
    1. running decodes, one token each, in priority/arrival order: they are never starved by
       long prompts;
    2. running prefills (prompts being prefilled in chunks, or recomputed after a preemption),
       as many of their pending tokens as the budget still allows (chunked prefill);
    3. waiting sequences, admitted in order while the budget, the cap and free cache blocks
       last; a prompt longer than what is left is admitted with its first chunk.
When a running sequence needs a cache block and none is free, the scheduler preempts the
lowest-priority, most recently arrived running sequence not yet scheduled in this step, itself
included: its blocks are freed and it returns to the waiting queue, to be recomputed
from its token ids later (prefix caching usually serves most of that recompute). No waiting
sequence is admitted in a step that preempted.

Requests that could never fit are refused before they get here (input_processor.py).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from lepton.engine.block_manager import BlockManager, NoFreeBlocksError
from lepton.engine.sequence import Sequence, SequenceStatus

# Admission leaves this share of the cache free while other sequences run, so that admitting a
# prompt does not immediately force a running decode out (vLLM uses the same 1% watermark).
WATERMARK = 0.01


def _sort_key(seq: Sequence) -> tuple[int, int, int]:
    return seq.sort_key


def _width(seq: Sequence) -> int:
    """Sequences this one stands for: n for a request's first sample before the fork, else 1."""
    return seq.request.params.n if seq.sample_index == 0 and not seq.request.forked else 1


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)   # copy-on-write (src, dst)
    preempted: list[Sequence] = field(default_factory=list)
    newly_admitted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Sequence] = []      # both sorted by Sequence.sort_key
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._watermark_blocks = int(WATERMARK * block_manager.num_blocks)

    # ---- queues -------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=_sort_key)

    def add_running(self, seq: Sequence) -> None:
        """A sequence forked from a running one (it already holds blocks)."""
        seq.status = SequenceStatus.RUNNING
        bisect.insort(self.running, seq, key=_sort_key)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Retire a finished or aborted sequence and return its blocks (idempotent)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        if seq.status is not SequenceStatus.FINISHED:
            seq.request.num_finished_seqs += 1
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free(seq.seq_id)
        seq.block_table = []

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq.seq_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.request.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    # ---- one step -------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager
        # Decodes first, then unfinished prefills; each group in priority/arrival order. This loop
        # runs every step over every running sequence, so the properties are spelled out inline.
        decodes, prefills = [], []
        for s in self.running:
            pending = len(s.token_ids) - s.num_computed_tokens
            (prefills if pending > 1 or s.num_computed_tokens < s.num_prompt_tokens else decodes).append(s)
        order = decodes + prefills
        seqs, counts, copies = out.seqs, out.num_new_tokens, out.block_copies
        running, append_slots = SequenceStatus.RUNNING, bm.append_slots
        for i, seq in enumerate(order):
            if budget == 0:
                break
            if seq.status is not running:   # preempted earlier in this loop
                continue
            computed = seq.num_computed_tokens
            n = min(len(seq.token_ids) - computed, budget)
            while True:
                try:   # fails without changing anything when the cache is out of blocks
                    pairs = append_slots(seq.seq_id, computed, n)
                    if pairs:
                        copies += pairs
                    break
                except NoFreeBlocksError:
                    # The lowest-priority, newest of those not yet scheduled, itself included.
                    victims = [s for s in order[i + 1:] if s.status is SequenceStatus.RUNNING] + [seq]
                    victim = max(victims, key=_sort_key)
                    self._preempt(victim)
                    out.preempted.append(victim)
                    if victim is seq:
                        break
            if seq.status is not running:
                continue
            seqs.append(seq)
            counts.append(n)
            budget -= n
        if self.waiting and not out.preempted:
            budget = self._admit(out, budget)
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> int:
        bm = self.block_manager
        # A request that will fork counts all its samples against the cap, before and after.
        occupied = sum(_width(s) for s in self.running)
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            request = seq.request
            width = _width(seq)
            if occupied + width > self.max_num_seqs and self.running:
                break
            # Prompt logprobs need the logits of every prompt token: no cached prefix for those.
            use_cache = not request.needs_prompt_logprobs
            reserve = self._watermark_blocks if self.running else 0
            if not bm.can_allocate(seq.token_ids, reserve * bm.block_size, use_cache, request.cache_salt):
                break
            self.waiting.pop(0)
            cached = bm.allocate(seq.seq_id, seq.token_ids, use_cache, request.cache_salt)
            seq.num_computed_tokens = cached
            seq.block_table = bm.block_table_view(seq.seq_id)
            if request.num_cached_tokens is None:
                request.num_cached_tokens = cached
            n = min(seq.num_pending_tokens, budget)
            out.block_copies += bm.append_slots(seq.seq_id, cached, n)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=_sort_key)
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
            out.newly_admitted.append(seq)
            occupied += width
            budget -= n
        return budget
