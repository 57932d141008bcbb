"""Per-request timings and engine-wide counters (what a server exports on /metrics).

Times are ``time.monotonic()`` seconds, so differences are meaningful and immune to clock jumps:
    time to first token (TTFT) = first_token_time - arrival_time
    time per output token (TPOT) = (last_token_time - first_token_time) / (output tokens - 1)
    end-to-end latency         = finished_time - arrival_time
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


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
