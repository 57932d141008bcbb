"""The serving loop: requests in, one scheduled forward per ``step()``, outputs out.

    engine.add_request("r1", "Hello", SamplingParams(max_tokens=32))
    while engine.has_unfinished_requests():
        for out in engine.step():          # RequestOutputs of the requests that progressed
            ...
    engine.abort("r1")                     # frees its blocks at once

A step: schedule (scheduler.py) -> copy-on-write block copies -> one forward over the flattened
batch -> publish computed blocks to the prefix cache -> sample every sequence whose tokens are
all computed (sampler.py; a request with n > 1 forks its samples here, sharing the prompt's
blocks) -> detokenize, check stop conditions, retire finished sequences -> build outputs.
Every public method takes the engine lock, so several threads may add, abort and step.
"""

from __future__ import annotations

import threading
import time

import torch

from lepton.engine.block_manager import BlockManager
from lepton.model_executor.kv_cache import blocks_needed
from lepton.engine.metrics import EngineStats, RequestMetrics
from lepton.outputs import RequestOutput
from lepton.engine.output_builder import add_prompt_logprobs, build_logprobs, build_output
from lepton.engine.sampler import SamplingRow, sample
from lepton.sampling_params import RequestOutputKind, SamplingParams
from lepton.engine.scheduler import Scheduler
from lepton.engine.sequence import OutputView, Request, Sequence
from lepton.engine.detokenizer import IncrementalDetokenizer
from lepton.tokenizer import encode


class EngineCoreMixin:
    """add_request / step / abort for ``Engine`` (which provides runner, tokenizer, limits)."""

    def _init_serving(self, num_blocks: int) -> None:
        cfg = self.config
        self.block_manager = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=cfg.max_num_seqs,
                                   max_num_batched_tokens=cfg.max_num_batched_tokens)
        self._requests: dict[str, Request] = {}
        self._lock = threading.RLock()
        self._next_seq_id = 0
        self._next_order = 0
        self._sampling_generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self._counters = dict(prompt=0, generation=0, finished=0, aborted=0)
        self._unclaimed_outputs: list[RequestOutput] = []   # produced while generate() stepped

    # ---- requests -------------------------------------------------------------------------------
    def make_request(self, request_id: str, prompt, params: SamplingParams | None = None, *,
                     arrival_time: float | None = None, priority: int = 0,
                     prompt_text: str | None = None, label: str | None = None) -> Request:
        """Validate and tokenize a request without touching engine state (so a server can do it
        outside the loop); ValueError with the reason when it can never run. ``label`` names the
        request in messages (default "request <id>")."""
        self._require_generative("generation")
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model folder has no tokenizer: pass prompts as token ids")
            prompt_text, ids = prompt, encode(self.tokenizer, prompt)[0]
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
        else:
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        label = label or f"request {request_id}"
        self.check_prompt(ids, label, generation=True)
        self._check_params(params, len(ids))
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(ids)
        total = len(ids) + max_tokens
        if total > self.max_model_len:
            raise ValueError(f"{label}: the prompt has {len(ids)} tokens and max_tokens is "
                             f"{max_tokens}: {total} tokens exceed max_model_len ({self.max_model_len})")
        if blocks_needed(total, self.block_manager.block_size) > self.block_manager.num_blocks:
            raise ValueError(f"{label}: {total} tokens need more than the whole KV cache "
                             f"({self.block_manager.num_blocks * self.block_manager.block_size} tokens)")
        arrival = time.monotonic() if arrival_time is None else arrival_time
        return Request(request_id, prompt_text, ids, params, priority, order=0, max_total_tokens=total,
                       metrics=RequestMetrics(arrival))

    def _check_params(self, params: SamplingParams, num_prompt_tokens: int) -> None:
        vocab = self.vocab_size
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n ({params.n}) exceeds max_num_seqs ({self.config.max_num_seqs}): the "
                             "samples of a request run together")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids")
        for name, value in (("logprobs", params.logprobs), ("prompt_logprobs", params.prompt_logprobs)):
            if value is not None and value > vocab:
                raise ValueError(f"{name} ({value}) exceeds the vocabulary size ({vocab})")
        for token in params.logit_bias or {}:
            if token >= vocab:
                raise ValueError(f"logit_bias names token id {token}, outside the vocabulary [0, {vocab})")

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None, *,
                    arrival_time: float | None = None, priority: int = 0) -> None:
        """Queue a prompt (string or token ids); its outputs come from ``step()``."""
        self.add_prepared(self.make_request(request_id, prompt, params, arrival_time=arrival_time,
                                            priority=priority))

    def add_prepared(self, request: Request) -> None:
        """Queue a request made by ``make_request``."""
        with self._lock:
            if request.request_id in self._requests:
                raise ValueError(f"request_id {request.request_id!r} is already in flight")
            request.order = self._next_order
            self._next_order += 1
            seq = self._new_seq(request, 0, list(request.prompt_token_ids))
            self._requests[request.request_id] = request
            self.scheduler.add(seq)

    def _new_seq(self, request: Request, sample_index: int, token_ids: list[int]) -> Sequence:
        params = request.params
        generator = None
        if params.seed is not None:   # sample k of a seeded request: its own derived stream
            seed = params.seed if sample_index == 0 else (params.seed * 1_000_003 + sample_index) % 2**63
            generator = torch.Generator(device=self.device).manual_seed(seed)
        seq = Sequence(self._next_seq_id, request, sample_index, token_ids, generator,
                       num_prompt_tokens=len(request.prompt_token_ids))
        self._next_seq_id += 1
        seq.sampling_row = SamplingRow(params, generator, request.prompt_token_ids, OutputView(seq))
        # Text is needed every step only when it is streamed or searched for stop strings;
        # otherwise it is decoded once, when the sequence ends (see _final_text).
        if self.tokenizer is not None and (params.stop or params.output_kind is not RequestOutputKind.FINAL_ONLY):
            seq.detokenizer = self._detokenizer(request)
        request.seqs.append(seq)
        return seq

    def _detokenizer(self, request: Request) -> IncrementalDetokenizer:
        params = request.params
        return IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids,
                                      skip_special_tokens=params.skip_special_tokens, stop=params.stop,
                                      include_stop_str_in_output=params.include_stop_str_in_output)

    def _final_text(self, seq: Sequence, drop_last_text: bool = False) -> None:
        """Flush the sequence's text (decoding it all now if it was not followed step by step)."""
        if self.tokenizer is None:
            return
        if seq.detokenizer is None:
            seq.detokenizer = self._detokenizer(seq.request)
            ids = seq.output_token_ids
            if drop_last_text:
                ids = ids[:-1]   # the eos / stop token: its text is not output (see _append_token)
            seq.detokenizer.update(ids)
        seq.detokenizer.finish()

    def abort(self, request_id: str | list[str]) -> list[RequestOutput]:
        """Stop requests now and free their blocks; returns their final outputs (finish_reason
        "abort"). Unknown or finished ids are ignored."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        outputs = []
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
                        self._final_text(seq)
                request.metrics.finished_time = time.monotonic()
                self._counters["aborted"] += 1
                outputs.append(build_output(self, request, force=True))
        return outputs

    def has_unfinished_requests(self) -> bool:
        """Requests in flight, or outputs that the next step() still has to hand out."""
        with self._lock:
            return bool(self._requests or self._unclaimed_outputs)

    def get_num_unfinished_requests(self) -> int:
        with self._lock:
            return len(self._requests)

    def stats(self) -> EngineStats:
        with self._lock:
            bm, c = self.block_manager, self._counters
            return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), bm.usage,
                               bm.prefix_cache_hit_rate, self.scheduler.num_preemptions, c["prompt"],
                               c["generation"], c["finished"], c["aborted"])

    # ---- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled forward; RequestOutputs of the requests that made progress."""
        with self._lock:
            if self._unclaimed_outputs:
                outputs, self._unclaimed_outputs = self._unclaimed_outputs, []
                return outputs
            sched = self.scheduler.schedule()
            now = time.monotonic()
            for seq in sched.newly_admitted:
                if seq.request.metrics.first_scheduled_time is None:
                    seq.request.metrics.first_scheduled_time = now
            if sched.is_empty:
                if self.scheduler.has_unfinished():   # cannot happen while admission checks hold
                    raise RuntimeError("the scheduler could not run any of the queued sequences")
                return []
            self.runner.copy_blocks(sched.block_copies)
            seqs, counts = sched.seqs, sched.num_new_tokens
            want_all = [s.request.needs_prompt_logprobs and s.sample_index == 0 for s in seqs]
            logits, full = self.runner.forward_step(seqs, counts, want_all if any(want_all) else None)
            touched: dict[str, Request] = {}
            ready: list[tuple[int, Sequence]] = []
            bs, bm = self.block_manager.block_size, self.block_manager
            for b, (seq, n) in enumerate(zip(seqs, counts)):
                start = seq.num_computed_tokens
                end = seq.num_computed_tokens = start + n
                if start < seq.num_prompt_tokens:
                    self._counters["prompt"] += min(end, seq.num_prompt_tokens) - start
                if end // bs > start // bs:   # a block filled up: publish it for prefix reuse
                    bm.cache_blocks(seq.seq_id, seq.token_ids, end)
                if full and b in full:
                    add_prompt_logprobs(self, seq.request, start, full[b])
                    touched[seq.request.request_id] = seq.request
                if end == len(seq.token_ids):
                    ready.append((b, seq))
            self._sample(logits, ready, touched)
            outputs = []
            for request in touched.values():
                out = build_output(self, request)
                if out is not None:
                    outputs.append(out)
                if request.finished:
                    self._requests.pop(request.request_id, None)
                    self._counters["finished"] += 1
            return outputs

    def _sample(self, logits: torch.Tensor, ready: list[tuple[int, Sequence]], touched: dict) -> None:
        index, targets = [], []
        for b, seq in ready:
            request = seq.request
            if not request.forked:   # the prompt is done: the other n - 1 samples share its blocks
                for k in range(1, request.params.n):
                    child = self._new_seq(request, k, list(seq.token_ids))
                    child.num_computed_tokens = seq.num_computed_tokens
                    self.block_manager.fork(seq.seq_id, child.seq_id)
                    child.block_table = self.block_manager.block_table_view(child.seq_id)
                    self.scheduler.add_running(child)
                    index.append(b)
                    targets.append(child)
            index.append(b)
            targets.append(seq)
        if not targets:
            return
        rows = [s.sampling_row for s in targets]
        if index != list(range(logits.shape[0])):
            logits = logits[torch.tensor(index, device=logits.device)]
        out = sample(logits, rows, eos_token_ids=self.eos_token_ids, generator=self._sampling_generator)
        now = time.monotonic()
        for r, seq in enumerate(targets):
            self._append_token(seq, out, r, now)
            touched[seq.request.request_id] = seq.request

    def _append_token(self, seq: Sequence, out, r: int, now: float) -> None:
        request, params = seq.request, seq.params
        metrics = request.metrics
        if not out.finite[r]:
            return self._finish(seq, "error", None, now)
        token = out.token_ids[r]
        seq.token_ids.append(token)
        self._counters["generation"] += 1
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        elif seq.sample_index == 0:
            metrics.inter_token_latencies.append(now - metrics.last_token_time)
        metrics.last_token_time = now
        if params.logprobs is not None:
            seq.cumulative_logprob += out.logprobs[r]
            seq.step_logprobs.append(build_logprobs(self, token, out.logprobs[r], out.ranks[r],
                                                    out.top_ids[r], out.top_logprobs[r]))
        checking = seq.num_output_tokens >= params.min_tokens   # no stop before min_tokens
        is_eos = checking and token in self.eos_token_ids and not params.ignore_eos
        is_stop_token = checking and token in params.stop_token_ids
        stop_str = None
        # A stop token stays in token_ids but, as in vLLM, its text is not part of the output.
        if seq.detokenizer is not None and not ((is_eos or is_stop_token)
                                                and not params.include_stop_str_in_output):
            stop_str = seq.detokenizer.update([token], check_stop=checking)
        drop = not params.include_stop_str_in_output
        if is_eos:
            self._finish(seq, "stop", None, now, drop_last_text=drop)
        elif is_stop_token:
            self._finish(seq, "stop", token, now, drop_last_text=drop)
        elif stop_str is not None:
            self._finish(seq, "stop", stop_str, now)
        elif len(seq.token_ids) >= request.max_total_tokens:
            self._finish(seq, "length", None, now)

    def _finish(self, seq: Sequence, reason: str, stop_reason, now: float, drop_last_text: bool = False) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self._final_text(seq, drop_last_text)
        self.scheduler.finish(seq)
        if seq.request.finished:
            seq.request.metrics.finished_time = now
