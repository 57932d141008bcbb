"""Prometheus metrics of one server: queue lengths, cache use and token counters read from the
engine at scrape time, latency histograms observed as requests finish.

Each app has its own CollectorRegistry, so several servers (tests) can live in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from lepton.engine.metrics import RequestMetrics

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _EngineCollector:
    """Reads the engine's stats snapshot: a scrape never waits for a step."""

    def __init__(self, async_engine):
        self.async_engine = async_engine

    def collect(self):
        stats = self.async_engine.engine.stats()
        yield GaugeMetricFamily("lepton_requests_running", "Requests with a sequence running.",
                                value=stats.num_running)
        yield GaugeMetricFamily("lepton_requests_waiting", "Requests queued, not running yet.",
                                value=self.async_engine.num_waiting())
        yield GaugeMetricFamily("lepton_kv_cache_usage", "Fraction of KV-cache blocks in use.",
                                value=stats.kv_cache_usage)
        yield GaugeMetricFamily("lepton_prefix_cache_hit_rate",
                                "Prompt tokens served from the prefix cache / prompt tokens.",
                                value=stats.prefix_cache_hit_rate)
        yield CounterMetricFamily("lepton_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                  value=stats.prefix_cache_queries)
        yield CounterMetricFamily("lepton_prefix_cache_hits", "Prompt tokens the prefix cache served.",
                                  value=stats.prefix_cache_hits)
        yield CounterMetricFamily("lepton_preemptions", "Sequences preempted (recomputed later).",
                                  value=stats.num_preemptions)
        yield CounterMetricFamily("lepton_prompt_tokens", "Prompt tokens computed.", value=stats.num_prompt_tokens)
        yield CounterMetricFamily("lepton_generation_tokens", "Tokens generated.",
                                  value=stats.num_generation_tokens)
        yield CounterMetricFamily("lepton_requests_finished", "Requests finished.",
                                  value=stats.num_requests_finished)
        yield CounterMetricFamily("lepton_requests_aborted", "Requests aborted.", value=stats.num_requests_aborted)
        ae = self.async_engine
        yield CounterMetricFamily("lepton_stream_backpressure_aborts",
                                  "Streams aborted because their client fell behind reading them "
                                  "(more than --max-stream-buffer-tokens output tokens buffered).",
                                  value=ae.num_backpressure_aborts)
        yield GaugeMetricFamily("lepton_requests_unread", "Finished requests whose output their client "
                                "has not read yet (they count toward --max-pending).", value=ae.num_unread())
        yield GaugeMetricFamily("lepton_stream_buffered_tokens", "Output tokens waiting for their "
                                "clients to read them.", value=ae.buffered_tokens())


class ServerMetrics:
    def __init__(self, async_engine=None):
        self.registry = CollectorRegistry()
        if async_engine is not None:
            self.registry.register(_EngineCollector(async_engine))
        self.ttft = Histogram("lepton_time_to_first_token_seconds", "Time to first token.",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("lepton_inter_token_latency_seconds", "Time between output tokens.",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("lepton_e2e_request_latency_seconds", "Arrival to finish.",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        # Counted as text is handed to the tokenizer, after the size limits: a request refused by
        # them (413) adds nothing.
        self.tokenized_chars = Counter("lepton_tokenized_chars", "Characters of text the server "
                                       "tokenized (prompts, messages, inputs).", registry=self.registry)

    def observe(self, metrics: RequestMetrics | None) -> None:
        if metrics is None:
            return
        if metrics.ttft is not None:
            self.ttft.observe(metrics.ttft)
        for gap in metrics.inter_token_latencies:
            self.itl.observe(gap)
        if metrics.e2e_latency is not None:
            self.e2e.observe(metrics.e2e_latency)

    def render(self) -> bytes:
        return generate_latest(self.registry)
