"""Prometheus metrics of one server: queue lengths, cache use and token counters read from the
engine at scrape time, histograms observed as requests finish.

Two sets, both on /metrics:
- ``lepton_*``: lepton's own; the routes observe the latency histograms as their requests finish.
- ``lepton:*``: vLLM's metrics (``vllm:*``) under lepton's prefix, with vLLM's names, types,
  labels (``model_name``, ``engine``) and buckets, so a dashboard or autoscaler built for vLLM
  works once the prefix is renamed. The engine hands them every step and abort
  (Engine.stat_loggers), so they count every request, those whose client left included.
  README "Metrics" lists them.

Each app has its own CollectorRegistry, so several servers (tests) can live in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from lepton.engine.metrics import IterationStats, RequestMetrics

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

PREFIX = "lepton:"
ENGINE_INDEX = "0"   # vLLM's engine label: lepton runs one engine core per server
FINISH_REASONS = ("stop", "length", "abort", "error")
# vLLM's bucket choices, so histograms from both servers can be compared bucket by bucket.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                           60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
N_BUCKETS = (1, 2, 5, 10, 20)


def buckets_1_2_5(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (token-count buckets, as vLLM's)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return out
            out.append(m * scale)
        scale *= 10


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


def cache_config_labels(engine) -> dict[str, str]:
    """lepton:cache_config_info's labels: the KV cache as the engine built it, values written as
    vLLM writes them (str() of the Python value: "True", "None")."""
    cfg = engine.config
    return {"block_size": str(cfg.block_size), "num_gpu_blocks": str(engine.num_kv_blocks),
            "enable_prefix_caching": str(cfg.enable_prefix_caching),
            "gpu_memory_utilization": str(cfg.gpu_memory_utilization),
            "kv_cache_memory_bytes": str(cfg.kv_cache_memory),
            "cache_dtype": str(engine.dtype).removeprefix("torch."), "engine": ENGINE_INDEX}


class _VllmStateCollector:
    """The ``lepton:*`` gauges and counters, read from the engine's snapshot at scrape time."""

    def __init__(self, async_engine, model_name: str):
        self.async_engine = async_engine
        self.labels = [model_name, ENGINE_INDEX]
        self.cache_config = cache_config_labels(async_engine.engine)

    def _family(self, kind, name: str, doc: str, value: float):
        family = kind(PREFIX + name, doc, labels=["model_name", "engine"])
        family.add_metric(self.labels, value)
        return family

    def collect(self):
        stats, g, c = self.async_engine.engine.stats(), GaugeMetricFamily, CounterMetricFamily
        yield self._family(g, "num_requests_running", "Requests in the running batch.", stats.num_running)
        yield self._family(g, "num_requests_waiting", "Requests queued, not admitted yet.",
                           self.async_engine.num_waiting())
        yield self._family(g, "kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = all of them).",
                           stats.kv_cache_usage)
        yield self._family(c, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                           stats.prefix_cache_queries)
        yield self._family(c, "prefix_cache_hits", "Prompt tokens the prefix cache served.",
                           stats.prefix_cache_hits)
        yield self._family(c, "num_preemptions", "Sequences preempted (their KV freed, recomputed later).",
                           stats.num_preemptions)
        yield self._family(c, "prompt_tokens", "Prompt tokens computed (prefix-cache hits excluded, "
                           "recomputation after preemption included).", stats.num_prompt_tokens)
        yield self._family(c, "generation_tokens", "Tokens generated.", stats.num_generation_tokens)
        info = GaugeMetricFamily(PREFIX + "cache_config_info", "The KV cache's configuration (value 1).",
                                 labels=list(self.cache_config))
        info.add_metric(list(self.cache_config.values()), 1)
        yield info


class VllmMetrics:
    """The ``lepton:*`` histograms and request counter, fed by the engine's IterationStats."""

    def __init__(self, registry: CollectorRegistry, async_engine, model_name: str):
        registry.register(_VllmStateCollector(async_engine, model_name))
        labels = (model_name, ENGINE_INDEX)
        token_buckets = buckets_1_2_5(async_engine.engine.max_model_len)

        def histogram(name: str, doc: str, buckets):
            return Histogram(PREFIX + name, doc, ["model_name", "engine"], buckets=buckets,
                             registry=registry).labels(*labels)

        self.iteration_tokens = histogram(
            "iteration_tokens_total", "Tokens per engine step: prompt tokens computed + tokens sampled.",
            ITERATION_TOKENS_BUCKETS)
        self.prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens per request.", token_buckets)
        self.generation_tokens = histogram(
            "request_generation_tokens", "Tokens generated per request (all its n completions).", token_buckets)
        self.params_n = histogram("request_params_n", "The n request parameter.", N_BUCKETS)
        self.params_max_tokens = histogram("request_params_max_tokens", "The max_tokens request parameter.",
                                           token_buckets)
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first output token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive output tokens "
                             "(of each request's first completion).", ITL_BUCKETS)
        self.times = [  # (histogram, the RequestMetrics property it observes)
            (histogram("e2e_request_latency_seconds", "Arrival to finish.", REQUEST_LATENCY_BUCKETS),
             "e2e_latency"),
            (histogram("request_queue_time_seconds", "Time waiting: arrival to first scheduled.",
                       REQUEST_LATENCY_BUCKETS), "time_in_queue"),
            (histogram("request_prefill_time_seconds", "Time in prefill: first scheduled to first token.",
                       REQUEST_LATENCY_BUCKETS), "prefill_time"),
            (histogram("request_decode_time_seconds", "Time in decode: first token to finish.",
                       REQUEST_LATENCY_BUCKETS), "decode_time"),
            (histogram("request_inference_time_seconds", "Time running: first scheduled to finish.",
                       REQUEST_LATENCY_BUCKETS), "inference_time"),
        ]
        success = Counter(PREFIX + "request_success", "Completions finished, by finish reason (a request "
                          "with n completions counts n times).", ["model_name", "engine", "finished_reason"],
                          registry=registry)
        self.success = {reason: success.labels(*labels, reason) for reason in FINISH_REASONS}
        self._success = success
        self._labels = labels
        async_engine.engine.stat_loggers.append(self.record)

    def record(self, stats: IterationStats) -> None:
        """(The engine loop's thread, under the engine's lock.)"""
        if stats.ran_forward:
            self.iteration_tokens.observe(stats.num_prompt_tokens + stats.num_generation_tokens)
        for req in stats.finished:
            metrics = req.metrics
            self.prompt_tokens.observe(req.num_prompt_tokens)
            self.generation_tokens.observe(req.num_generation_tokens)
            self.params_n.observe(req.n)
            self.params_max_tokens.observe(req.max_tokens)
            if metrics.ttft is not None:
                self.ttft.observe(metrics.ttft)
            for gap in metrics.inter_token_latencies:
                self.itl.observe(gap)
            for hist, prop in self.times:
                value = getattr(metrics, prop)
                if value is not None:
                    hist.observe(value)
            for reason in req.finish_reasons:
                counter = self.success.get(reason)
                if counter is None:   # a reason vLLM does not have: counted all the same
                    counter = self.success[reason] = self._success.labels(*self._labels, reason)
                counter.inc()


class ServerMetrics:
    def __init__(self, async_engine=None, model_name: str | None = None):
        self.registry = CollectorRegistry()
        self.vllm = None
        if async_engine is not None:
            self.registry.register(_EngineCollector(async_engine))
            self.vllm = VllmMetrics(self.registry, async_engine, model_name or "lepton")
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
