"""The engine core: scheduler + KV cache manager (block manager) + executor, behind one lock.

    core.add_request(request)          # a Request made by the input processor
    out = core.step()                  # one scheduled forward; the tokens it produced
    core.finish_stopped([(seq, "END")])  # sequences the output processor saw a stop string in
    core.abort(["r1"])                 # frees their blocks at once

A step: schedule (scheduler.py) -> the executor runs one forward over the flattened batch
(copy-on-write block copies first) and samples every sequence whose tokens are all computed
-> publish filled blocks to the prefix cache -> append each sampled token and check the stops
that need no text: eos (after min_tokens, unless ignore_eos), stop_token_ids, and length
(prompt + max_tokens, capped at max_model_len). Stop strings need text: the output processor
finds them and hands the sequences back through ``finish_stopped`` before the next step.

A request with structured outputs waits outside the scheduler until its grammar is compiled
(structured_output/manager.py); each step's sampled sequences then get their grammar's bitmask.

A request with n > 1 forks when its prompt is done: the other n - 1 samples share the prompt's
blocks (copy-on-write) and are sampled from the same logits in that step.

Every public method takes the core's lock, so several threads may add, abort and step; ``stats``
returns the snapshot published after the last change and never waits for a step.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from lepton.engine.block_manager import BlockManager
from lepton.engine.metrics import EngineStats
from lepton.engine.scheduler import Scheduler
from lepton.engine.sequence import Request, Sequence, SequenceStatus
from lepton.engine.structured_output.manager import StructuredOutputManager
from lepton.model_executor.executor import Executor
from lepton.model_executor.step import PromptLogprobsRequest, StepInput


@dataclass(slots=True)
class SampledToken:
    """One sequence's new token of this step (token_id None: its logits were NaN/inf).
    ``stopped_by_token``: eos or a stop token id ended the sequence with this token."""

    seq: Sequence
    token_id: int | None
    logprob: float | None = None
    rank: int | None = None
    top_ids: list[int] | None = None
    top_logprobs: list[float] | None = None
    stopped_by_token: bool = False


@dataclass(slots=True)
class PromptLogprobs:
    """Raw logprobs of prompt tokens ``first .. first + len(token_ids) - 1`` of a request."""

    request: Request
    first: int
    token_ids: list[int]
    stats: tuple   # (logprobs, ranks, top ids, top logprobs), one entry per token


@dataclass
class CoreOutput:
    sampled: list[SampledToken] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)
    num_scheduled: int = 0   # sequences that ran: 0 when there was nothing to run
    num_prompt_tokens: int = 0   # prompt tokens the forward computed (cached ones excluded)
    num_compiling: int = 0   # requests still waiting for their grammar (structured outputs)


class EngineCore:
    def __init__(self, executor: Executor, num_blocks: int, *, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, enable_prefix_caching: bool, eos_token_ids):
        self.executor = executor
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens)
        self.eos_token_ids = frozenset(eos_token_ids)
        self._lock = threading.RLock()
        self._requests: dict[str, Request] = {}
        self._next_seq_id = 0
        self._next_order = 0
        self._counters = dict(prompt=0, generation=0, finished=0, aborted=0)
        self._left: list[int] = []   # sequences that left the batch since the last step
        self.structured = StructuredOutputManager()   # the engine gives it a grammar compiler
        self._stats = self._snapshot()

    # ---- requests -----------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a validated request (ValueError if its id is in flight)."""
        with self._lock:
            if request.request_id in self._requests:
                raise ValueError(f"request_id {request.request_id!r} is already in flight")
            request.order = self._next_order
            self._next_order += 1
            self._requests[request.request_id] = request
            seq = self._new_seq(request, 0, list(request.prompt_token_ids))
            if request.params.structured_outputs is not None:   # queued once its grammar compiled
                self.structured.hold(seq)
            else:
                self.scheduler.add(seq)
            self._publish()

    def _new_seq(self, request: Request, sample_index: int, token_ids: list[int]) -> Sequence:
        seed = request.params.seed
        if seed is not None and sample_index:   # sample k of a seeded request: its own derived stream
            seed = (seed * 1_000_003 + sample_index) % 2**63
        seq = Sequence(self._next_seq_id, request, sample_index, token_ids, seed,
                       num_prompt_tokens=len(request.prompt_token_ids))
        self._next_seq_id += 1
        request.seqs.append(seq)
        return seq

    def abort(self, request_ids) -> list[Request]:
        """Stop requests now and free their blocks; returns the requests that were in flight
        (their unfinished sequences end with finish_reason "abort"). Unknown ids are ignored."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        aborted = []
        with self._lock:
            for rid in ids:
                request = self._requests.pop(rid, None)
                if request is None:
                    continue
                request.aborted = True
                for seq in request.seqs:
                    if not seq.finished:
                        seq.finish_reason = "abort"
                        self.scheduler.finish(seq)
                        self._left.append(seq.seq_id)
                self._counters["aborted"] += 1
                aborted.append(request)
            self._publish()
        return aborted

    def finish_stopped(self, stopped: list[tuple[Sequence, str]]) -> None:
        """Finish sequences in which the output processor found a stop string."""
        with self._lock:
            for seq, stop_str in stopped:
                if seq.finished:
                    continue
                seq.finish_reason, seq.stop_reason = "stop", stop_str
                self._retire(seq)
            self._publish()

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return bool(self._requests)

    def stats(self) -> EngineStats:
        """The snapshot published after the last add, abort or step (no lock: never waits)."""
        return self._stats

    def _snapshot(self) -> EngineStats:
        bm, c = self.block_manager, self._counters
        waiting = len(self.scheduler.waiting) + len(self.structured.pending)
        return EngineStats(len(self.scheduler.running), waiting, bm.usage,
                           bm.prefix_cache_queries, bm.prefix_cache_hits, self.scheduler.num_preemptions,
                           c["prompt"], c["generation"], c["finished"], c["aborted"])

    def _publish(self) -> None:
        self._stats = self._snapshot()

    # ---- the step -------------------------------------------------------------------------------
    def step(self) -> CoreOutput:
        """Run one scheduled forward and sample; what it produced."""
        with self._lock:
            out = CoreOutput()
            if self.structured.pending:
                self._release_compiled(out)
            sched = self.scheduler.schedule()
            self._publish()   # admitted requests are running now, also while the forward runs
            if sched.is_empty:
                if self.scheduler.has_unfinished():   # cannot happen while admission checks hold
                    raise RuntimeError("the scheduler could not run any of the queued sequences")
                return out
            now = time.monotonic()
            for seq in sched.newly_admitted:
                if seq.request.metrics.first_scheduled_time is None:
                    seq.request.metrics.first_scheduled_time = now
            seqs, counts = sched.seqs, sched.num_new_tokens
            self._left += [seq.seq_id for seq in sched.preempted]
            sample_rows, sample_seqs, prompt_rows = self._plan_samples(seqs, counts)
            left, self._left = self._left, []
            try:
                result = self.executor.execute_model(StepInput(seqs, counts, sched.block_copies, sample_rows,
                                                               sample_seqs, [row for row, _ in prompt_rows], left,
                                                               self.structured.bitmask(sample_seqs)))
            except BaseException:
                # The runner may not have seen these leave: tell it again next step (removal is
                # idempotent), so a caller that aborts this step's requests and serves on
                # (AsyncEngine) leaves no stale row in its persistent batch.
                self._left = left + self._left
                raise
            bs, bm = self.block_manager.block_size, self.block_manager
            num_prompt = 0
            for seq, n in zip(seqs, counts):
                start = seq.num_computed_tokens
                end = seq.num_computed_tokens = start + n
                if start < seq.num_prompt_tokens:
                    num_prompt += min(end, seq.num_prompt_tokens) - start
                if end // bs > start // bs:   # a block filled up: publish it for prefix reuse
                    bm.cache_blocks(seq.seq_id, seq.token_ids, end)
            self._counters["prompt"] += num_prompt
            out.num_prompt_tokens = num_prompt
            out.prompt_logprobs = [PromptLogprobs(request, row.first_position, row.token_ids, stats)
                                   for (row, request), stats in zip(prompt_rows, result.prompt_logprobs)]
            out.sampled += self._append_tokens(sample_seqs, result)
            self.structured.accept(out.sampled)
            out.num_scheduled = len(seqs)
            self._publish()
            return out

    def _release_compiled(self, out: CoreOutput) -> None:
        """Queue the requests whose grammar is compiled; one whose compilation failed ends with
        finish_reason "error". With nothing else to run, waits briefly for a compilation."""
        ready, failed = self.structured.release(idle=not self.scheduler.has_unfinished())
        for seq in ready:
            self.scheduler.add(seq)
        for seq in failed:
            seq.finish_reason = "error"
            self._retire(seq)
            out.sampled.append(SampledToken(seq, None))
        out.num_compiling = len(self.structured.pending)

    def _plan_samples(self, seqs: list[Sequence], counts: list[int]
                      ) -> tuple[list[int], list[Sequence], list[tuple[PromptLogprobsRequest, Request]]]:
        """Which sequences to sample and from which batch row (forking n > 1 requests whose
        prompt completes now: their samples share the row), and which rows need logits of
        every new token (prompt logprobs)."""
        rows, samples, prompt_rows = [], [], []
        for b, (seq, n) in enumerate(zip(seqs, counts)):
            request = seq.request
            params = request.params
            if params.prompt_logprobs is not None and seq.sample_index == 0 and request.needs_prompt_logprobs:
                row = self._prompt_logprobs_row(b, request, seq.num_computed_tokens, n)
                if row is not None:
                    prompt_rows.append((row, request))
            if seq.num_computed_tokens + n != len(seq.token_ids):
                continue
            rows.append(b)
            samples.append(seq)
            if params.n > 1 and not request.forked:   # the prompt is done: the others share its blocks
                for k in range(1, params.n):
                    child = self._new_seq(request, k, list(seq.token_ids))
                    child.num_computed_tokens = seq.num_computed_tokens + n
                    self.block_manager.fork(seq.seq_id, child.seq_id)
                    child.block_table = self.block_manager.block_table_view(child.seq_id)
                    self.scheduler.add_running(child)
                    rows.append(b)
                    samples.append(child)
        return rows, samples, prompt_rows

    @staticmethod
    def _prompt_logprobs_row(b: int, request: Request, start: int, n: int) -> PromptLogprobsRequest | None:
        """The logits after positions start..start+n-1 score prompt tokens start+1..start+n;
        position 0 has no logprob. Scores the prompt tokens not scored yet that this chunk reaches."""
        first = max(1, request.num_prompt_logprobs)
        last = min(start + n, len(request.prompt_token_ids) - 1)
        if last < first or first <= start:
            return None
        request.num_prompt_logprobs = last + 1
        return PromptLogprobsRequest(b, first - 1 - start, first, request.prompt_token_ids[first:last + 1],
                                     request.params.prompt_logprobs)

    def _append_tokens(self, seqs: list[Sequence], result) -> list[SampledToken]:
        """Append each sampled token and check the stops that need no text (eos, stop token
        ids, length); a sequence with unusable logits finishes with "error"."""
        out = []
        eos, finite, token_ids = self.eos_token_ids, result.finite, result.token_ids
        for r, seq in enumerate(seqs):
            if not finite[r]:
                seq.finish_reason = "error"
                self._retire(seq)
                out.append(SampledToken(seq, None))
                continue
            request = seq.request
            params = request.params
            token = token_ids[r]
            tokens = seq.token_ids
            tokens.append(token)
            sampled = SampledToken(seq, token)
            out.append(sampled)
            if params.logprobs is not None:
                sampled.logprob, sampled.rank = result.logprobs[r], result.ranks[r]
                sampled.top_ids, sampled.top_logprobs = result.top_ids[r], result.top_logprobs[r]
            if len(tokens) - seq.num_prompt_tokens >= params.min_tokens:   # no stop before min_tokens
                if token in eos and not params.ignore_eos:
                    seq.finish_reason = "stop"
                    sampled.stopped_by_token = True
                elif params.stop_token_ids and token in params.stop_token_ids:
                    seq.finish_reason, seq.stop_reason = "stop", token
                    sampled.stopped_by_token = True
            if seq.finish_reason is None and len(tokens) >= request.max_total_tokens:
                seq.finish_reason = "length"
            if seq.finish_reason is not None:
                self._retire(seq)
        self._counters["generation"] += len(out) - sum(s.token_id is None for s in out)
        return out

    def _retire(self, seq: Sequence) -> None:
        """Free a finished sequence; count its request once all its samples are done."""
        self.scheduler.finish(seq)
        self._left.append(seq.seq_id)
        request = seq.request
        if request.finished and self._requests.pop(request.request_id, None) is not None:
            self._counters["finished"] += 1
