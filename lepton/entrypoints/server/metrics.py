"""Prometheus metrics of one server: queue lengths, cache use and token counters read from the
engine at scrape time, latency histograms observed as requests finish.

Each app has its own CollectorRegistry, so several servers (tests) can live in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from lepton.engine.metrics import RequestMetrics

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _EngineCollector:
    """Reads the engine without its lock (plain attribute reads): a scrape never waits for a step."""

    def __init__(self, async_engine):
        self.async_engine = async_engine

    def collect(self):
        ae = self.async_engine
        engine = ae.engine
        running = {s.request.request_id for s in list(engine.scheduler.running)}
        waiting = {s.request.request_id for s in list(engine.scheduler.waiting)}
        bm, counters = engine.block_manager, engine._counters
        yield GaugeMetricFamily("lepton_requests_running", "Requests with a sequence running.",
                                value=len(running))
        yield GaugeMetricFamily("lepton_requests_waiting", "Requests queued, not running yet.",
                                value=len(waiting - running) + len(ae._pending_adds))
        yield GaugeMetricFamily("lepton_kv_cache_usage", "Fraction of KV-cache blocks in use.", value=bm.usage)
        yield GaugeMetricFamily("lepton_prefix_cache_hit_rate",
                                "Prompt tokens served from the prefix cache / prompt tokens.",
                                value=bm.prefix_cache_hit_rate)
        yield CounterMetricFamily("lepton_preemptions", "Sequences preempted (recomputed later).",
                                  value=engine.scheduler.num_preemptions)
        yield CounterMetricFamily("lepton_prompt_tokens", "Prompt tokens computed.", value=counters["prompt"])
        yield CounterMetricFamily("lepton_generation_tokens", "Tokens generated.", value=counters["generation"])
        yield CounterMetricFamily("lepton_requests_finished", "Requests finished.", value=counters["finished"])
        yield CounterMetricFamily("lepton_requests_aborted", "Requests aborted.", value=counters["aborted"])


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
