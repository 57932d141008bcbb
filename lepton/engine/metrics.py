"""Per-request timings, engine-wide counters, and what each step hands to a server's /metrics.

Times are ``time.monotonic()`` seconds, so differences are meaningful and immune to clock jumps.
A request is stamped on arrival, when it is first scheduled, at its first and last output token,
and when it finishes:
    time to first token (TTFT) = first_token_time - arrival_time
    time per output token (TPOT) = (last_token_time - first_token_time) / (output tokens - 1)
    end-to-end latency         = finished_time - arrival_time
    queue time                 = first_scheduled_time - arrival_time
    prefill time               = first_token_time - first_scheduled_time
    decode time                = finished_time - first_token_time
    inference time             = finished_time - first_scheduled_time   (= prefill + decode)
so end-to-end = queue + prefill + decode. A time whose stamps are missing (a request aborted
before it ran or before its first token) is None.

Stat loggers (``Engine.stat_loggers``) get an ``IterationStats`` after every step that ran a
forward and after every abort: the tokens the step computed and the requests that finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _interval(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else end - start


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    # Gaps between consecutive output tokens of the first completion (inter-token latency).
    inter_token_latencies: list[float] = field(default_factory=list)

    @property
    def time_in_queue(self) -> float | None:
        return _interval(self.arrival_time, self.first_scheduled_time)

    @property
    def ttft(self) -> float | None:
        return _interval(self.arrival_time, self.first_token_time)

    @property
    def e2e_latency(self) -> float | None:
        return _interval(self.arrival_time, self.finished_time)

    @property
    def prefill_time(self) -> float | None:
        return _interval(self.first_scheduled_time, self.first_token_time)

    @property
    def decode_time(self) -> float | None:
        return _interval(self.first_token_time, self.finished_time)

    @property
    def inference_time(self) -> float | None:
        return _interval(self.first_scheduled_time, self.finished_time)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine: queue lengths, cache use, and counters since it started."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float               # fraction of cache blocks in use (not free, not cached)
    prefix_cache_queries: int           # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int              # of those, tokens the cache served
    num_preemptions: int
    num_prompt_tokens: int              # prompt tokens computed (cached ones excluded)
    num_generation_tokens: int
    num_requests_finished: int
    num_requests_aborted: int

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Prompt tokens served from the prefix cache / prompt tokens looked up (0 before any)."""
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


@dataclass(frozen=True)
class FinishedRequestStats:
    """A request once it has finished (every completion ended, or it was aborted)."""

    num_prompt_tokens: int
    num_generation_tokens: int          # output tokens of all its completions together
    n: int                              # the n parameter: completions asked for
    max_tokens: int                     # the max_tokens parameter (unset: what max_model_len left)
    finish_reasons: tuple[str, ...]     # one per completion: stop, length, abort or error
    metrics: RequestMetrics

    @classmethod
    def of(cls, request) -> FinishedRequestStats:
        """From a finished ``sequence.Request``. Completions of an aborted request that never
        forked from its first one count as aborted."""
        num_prompt, params = len(request.prompt_token_ids), request.params
        max_tokens = params.max_tokens if params.max_tokens is not None else request.max_total_tokens - num_prompt
        reasons = tuple(seq.finish_reason or "abort" for seq in request.seqs)
        reasons += ("abort",) * (params.n - len(reasons))
        generated = sum(len(seq.token_ids) - seq.num_prompt_tokens for seq in request.seqs)
        return cls(num_prompt, generated, params.n, max_tokens, reasons, request.metrics)


@dataclass
class IterationStats:
    """What one engine step (or abort) adds to the metrics."""

    num_prompt_tokens: int = 0          # prompt tokens the step's forward computed (cached ones excluded)
    num_generation_tokens: int = 0      # tokens it sampled
    ran_forward: bool = False           # False for an abort
    finished: list[FinishedRequestStats] = field(default_factory=list)

    @classmethod
    def of_step(cls, core_output) -> IterationStats:
        """From a ``core.CoreOutput`` whose stop strings the core has been told about and whose
        finished requests the output processor has stamped: every request that finished in the
        step sampled in it."""
        finished, seen = [], set()
        for sampled in core_output.sampled:
            request = sampled.seq.request
            if request.finished and id(request) not in seen:
                seen.add(id(request))
                finished.append(FinishedRequestStats.of(request))
        generated = sum(s.token_id is not None for s in core_output.sampled)
        return cls(core_output.num_prompt_tokens, generated, True, finished)

    @classmethod
    def of_abort(cls, requests) -> IterationStats:
        return cls(finished=[FinishedRequestStats.of(r) for r in requests])


def log_stats(loggers, stats: IterationStats) -> None:
    """Hand ``stats`` to each logger (called under the engine's lock: loggers must be quick)."""
    for log in loggers:
        log(stats)
