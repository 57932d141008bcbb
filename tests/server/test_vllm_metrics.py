"""The ``lepton:*`` metrics: vLLM's names, types, labels and buckets, and values that follow known
requests. Expectations are computed here, independently of the server: prompt lengths from the
transformers tokenizer, generation lengths from max_tokens with ignore_eos, step counts from what
continuous batching does with one short request at a time, bucket bounds as vLLM declares them.

The shared server serves other test files too, so every check compares a before and an after
scrape. No assert depends on how long anything took.
"""

from __future__ import annotations

import json
import re
import uuid
from types import SimpleNamespace

import httpx
import pytest

from lepton.engine.engine import Engine
from lepton.sampling_params import SamplingParams
from tests.engine import checkpoint
from tests.server.conftest import (MAX_MODEL_LEN, MODEL_NAME, OVERRIDE_TEMPLATE, ServerProcess, chat_ids,
                                   prompt_ids, wait_idle)

P = "lepton:"
LABELS = {"model_name": MODEL_NAME, "engine": "0"}
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})
LATENCY = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
           240.0, 480.0, 960.0, 1920.0, 7680.0]
TOKENS = [1, 2, 5, 10, 20, 50, 100, 200]   # vLLM's 1-2-5 buckets up to max_model_len (256)
FAMILIES = {   # family -> (type, upper bounds of its buckets) as vLLM declares them
    "num_requests_running": ("gauge", None), "num_requests_waiting": ("gauge", None),
    "kv_cache_usage_perc": ("gauge", None), "cache_config_info": ("gauge", None),
    "prefix_cache_queries": ("counter", None), "prefix_cache_hits": ("counter", None),
    "num_preemptions": ("counter", None), "prompt_tokens": ("counter", None),
    "generation_tokens": ("counter", None), "request_success": ("counter", None),
    "iteration_tokens_total": ("histogram", [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]),
    "request_prompt_tokens": ("histogram", TOKENS), "request_generation_tokens": ("histogram", TOKENS),
    "request_params_n": ("histogram", [1, 2, 5, 10, 20]), "request_params_max_tokens": ("histogram", TOKENS),
    "time_to_first_token_seconds": ("histogram", [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
                                                  0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0,
                                                  640.0, 2560.0]),
    "inter_token_latency_seconds": ("histogram", [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                                                  0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]),
    "e2e_request_latency_seconds": ("histogram", LATENCY), "request_queue_time_seconds": ("histogram", LATENCY),
    "request_prefill_time_seconds": ("histogram", LATENCY), "request_decode_time_seconds": ("histogram", LATENCY),
    "request_inference_time_seconds": ("histogram", LATENCY),
}
TIMES = ("e2e_request_latency_seconds", "request_queue_time_seconds", "request_prefill_time_seconds",
         "request_decode_time_seconds", "request_inference_time_seconds", "time_to_first_token_seconds")


def families(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    resp = httpx.get(f"{url}/metrics", timeout=10.0)
    assert resp.status_code == 200, resp.text[:500]
    return {f.name: f for f in text_string_to_metric_families(resp.text)}


def scrape(url: str) -> dict[str, float]:
    """The ``lepton:*`` samples, keyed by name plus the labels other than model_name/engine
    ('lepton:request_success_total{finished_reason=stop}', '..._bucket{le=1.0}')."""
    values = {}
    for family in families(url).values():
        for s in family.samples:
            if s.name.startswith(P):
                extra = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k not in LABELS)
                values[s.name + (f"{{{extra}}}" if extra else "")] = s.value
    return values


def delta(before: dict, after: dict, name: str) -> float:
    return after[P + name] - before[P + name]


def unique(words: int = 3) -> str:
    """Text no earlier request started with: no prefix-cache hit shortens it."""
    return f"{uuid.uuid4().hex} " + " ".join(["metrics"] * words)


def loaded_blocks(server: ServerProcess) -> tuple[int, int]:
    """(blocks, block size) from the server's own startup line."""
    line = next(line for line in server.stdout_lines if "KV cache" in line)
    blocks, size = re.search(r"KV cache (\d+) blocks of (\d+) tokens", line).groups()
    return int(blocks), int(size)


# -- names, types, labels, buckets -----------------------------------------------------------------

def test_families_have_vllm_types_labels_and_buckets(server):
    fams = families(server.url)
    for name, (kind, bounds) in FAMILIES.items():
        family = fams.get(P + name)
        assert family is not None, f"/metrics lacks {P}{name}"
        assert family.type == kind, (name, family.type)
        if name == "cache_config_info":
            continue
        for s in family.samples:
            if not s.name.endswith("_created"):
                assert {k: s.labels.get(k) for k in LABELS} == LABELS, (s.name, s.labels)
        if bounds is not None:
            les = [float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")]
            assert les == [float(b) for b in bounds] + [float("inf")], name
    reasons = {s.labels["finished_reason"] for s in fams[P + "request_success"].samples
               if s.name.endswith("_total")}
    assert reasons >= {"stop", "length", "abort", "error"}


def test_cache_config_info_matches_the_flags(server):
    blocks, _ = loaded_blocks(server)
    [sample] = families(server.url)[P + "cache_config_info"].samples
    assert sample.value == 1
    # The shared server leaves these flags at vLLM's defaults and passes --dtype float32.
    assert sample.labels == {"block_size": "16", "num_gpu_blocks": str(blocks), "enable_prefix_caching": "True",
                             "gpu_memory_utilization": "0.9", "kv_cache_memory_bytes": "None",
                             "cache_dtype": "float32", "engine": "0"}


def test_cache_config_and_prefix_counters_follow_other_flags(model_dir, tokenizer, tmp_path):
    config = json.loads((model_dir / "config.json").read_text())
    # float32 K and V for every layer and KV head: the size of one 32-token block.
    block_bytes = 2 * config["num_hidden_layers"] * 32 * config["num_key_value_heads"] * config["head_dim"] * 4
    args = ["--block-size", "32", "--kv-cache-memory", "1M", "--no-enable-prefix-caching",
            "--gpu-memory-utilization", "0.5", "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
            "--served-model-name", "other-name"]
    with ServerProcess(model_dir, args, tmp_path) as other:
        [sample] = families(other.url)[P + "cache_config_info"].samples
        assert sample.labels == {"block_size": "32", "num_gpu_blocks": str((1 << 20) // block_bytes),
                                 "enable_prefix_caching": "False", "gpu_memory_utilization": "0.5",
                                 "kv_cache_memory_bytes": str(1 << 20), "cache_dtype": "float32", "engine": "0"}
        prompt = unique(8)
        before = families(other.url)
        for _ in range(2):
            r = httpx.post(f"{other.url}/v1/completions", timeout=60.0, json=dict(
                model="other-name", prompt=prompt, max_tokens=1, temperature=0))
            assert r.status_code == 200, r.text
        after = families(other.url)

    def value(fams, name):
        [s] = [s for s in fams[P + name].samples if s.name.endswith("_total")]
        assert s.labels == {"model_name": "other-name", "engine": "0"}
        return s.value

    # Without prefix caching nothing is looked up, and the repeat is computed in full.
    for name in ("prefix_cache_queries", "prefix_cache_hits"):
        assert value(after, name) - value(before, name) == 0
    assert value(after, "prompt_tokens") - value(before, "prompt_tokens") == 2 * len(prompt_ids(tokenizer, prompt))


# -- values that follow known requests -------------------------------------------------------------

def test_request_histograms_and_counters_follow_known_requests(server, client, tokenizer):
    messages = [{"role": "user", "content": unique()}]
    a, b = unique(), unique(5)
    # (prompt tokens, n, max_tokens) of each request; every completion runs to max_tokens.
    plan = [(len(prompt_ids(tokenizer, a)), 1, 5), (len(prompt_ids(tokenizer, b)), 2, 3),
            (len(chat_ids(tokenizer, messages, OVERRIDE_TEMPLATE)), 1, 4)]
    before = (wait_idle(server.url), scrape(server.url))
    client.completions.create(model=MODEL_NAME, prompt=a, max_tokens=5, **GREEDY)
    client.completions.create(model=MODEL_NAME, prompt=b, max_tokens=3, n=2, **GREEDY)
    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=4, stream=True,
                                            **GREEDY)
    assert len([c for c in stream if c.choices and c.choices[0].delta.content is not None]) >= 1
    after = (wait_idle(server.url), scrape(server.url))
    old, new = before[1], after[1]

    prompt = sum(p for p, _, _ in plan)
    generated = sum(n * m for _, n, m in plan)
    assert delta(old, new, "num_preemptions_total") == 0
    assert delta(old, new, "prefix_cache_hits_total") == 0
    assert delta(old, new, "prefix_cache_queries_total") == prompt
    assert delta(old, new, "prompt_tokens_total") == prompt
    assert delta(old, new, "generation_tokens_total") == generated
    # lepton's own counters agree with their lepton: twins
    assert after[0]["lepton_prompt_tokens_total"] - before[0]["lepton_prompt_tokens_total"] == prompt
    assert after[0]["lepton_generation_tokens_total"] - before[0]["lepton_generation_tokens_total"] == generated

    expected = {"request_prompt_tokens": (3, prompt), "request_generation_tokens": (3, generated),
                "request_params_n": (3, 4), "request_params_max_tokens": (3, 12),
                # one request at a time, each prompt in one chunk: max_tokens steps per request
                "iteration_tokens_total": (5 + 3 + 4, prompt + generated),
                # gaps between the tokens of each request's first completion
                "inter_token_latency_seconds": ((5 - 1) + (3 - 1) + (4 - 1), None)}
    expected.update({name: (3, None) for name in TIMES})
    for name, (count, total) in expected.items():
        assert delta(old, new, f"{name}_count") == count, name
        if total is not None:
            assert delta(old, new, f"{name}_sum") == total, name
    assert delta(old, new, "request_params_n_bucket{le=1.0}") == 2
    assert delta(old, new, "request_params_n_bucket{le=2.0}") == 3
    # decode steps of the n = 1 requests compute one token each
    assert delta(old, new, "iteration_tokens_total_bucket{le=1.0}") == (5 - 1) + (4 - 1)
    reasons = {r: delta(old, new, f"request_success_total{{finished_reason={r}}}")
               for r in ("stop", "length", "abort", "error")}
    assert reasons == {"stop": 0, "length": 4, "abort": 0, "error": 0}
    # end-to-end = queue + prefill + decode, inference = prefill + decode (the same stamps)
    sums = {name: delta(old, new, f"{name}_sum") for name in TIMES}
    parts = ("request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds")
    assert sums["e2e_request_latency_seconds"] == pytest.approx(sum(sums[p] for p in parts), abs=1e-6)
    assert sums["request_inference_time_seconds"] == pytest.approx(sum(sums[p] for p in parts[1:]), abs=1e-6)
    assert all(v >= 0 for v in sums.values()), sums


def test_prefix_cache_counters_follow_a_repeated_prompt(server, client, tokenizer):
    prompt = unique(8)
    length = len(prompt_ids(tokenizer, prompt))
    block = loaded_blocks(server)[1]
    assert length > 2 * block
    moves = []
    for _ in range(2):
        before = scrape(server.url)
        client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=1, **GREEDY)
        after = scrape(server.url)
        moves.append(tuple(delta(before, after, f"{name}_total")
                           for name in ("prefix_cache_queries", "prefix_cache_hits", "prompt_tokens")))
    # The repeat reuses every full block but the one holding the last prompt token, which is
    # computed again for its logits.
    hits = (length - 1) // block * block
    assert moves == [(length, 0, length), (length, hits, length - hits)]


# -- aborts (in-process: a server cannot abort at a known step) -------------------------------------

def test_aborted_requests_reach_the_stat_loggers(tmp_path_factory):
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from lepton.entrypoints.server.metrics import VllmMetrics

    engine = Engine(checkpoint(tmp_path_factory, "llama"), device="cpu", max_model_len=128)
    logged = []
    engine.stat_loggers.append(logged.append)
    registry = CollectorRegistry()
    VllmMetrics(registry, SimpleNamespace(engine=engine, num_waiting=lambda: 0), "m")
    engine.add_request("ran", [1, 5, 9, 13, 17], SamplingParams(n=2, max_tokens=50, ignore_eos=True))
    engine.step()   # the prompt, the fork, each completion's first token
    engine.add_request("queued", [2, 4, 6], SamplingParams(n=3, max_tokens=7))
    engine.abort(["ran", "queued"])

    step, abort = logged
    assert (step.ran_forward, step.num_prompt_tokens, step.num_generation_tokens, step.finished) == (True, 5, 2, [])
    assert not abort.ran_forward and abort.num_prompt_tokens == abort.num_generation_tokens == 0
    by_n = {f.n: f for f in abort.finished}
    ran, queued = by_n[2], by_n[3]
    assert (ran.num_prompt_tokens, ran.num_generation_tokens, ran.max_tokens, ran.finish_reasons) == \
        (5, 2, 50, ("abort", "abort"))
    assert None not in (ran.metrics.time_in_queue, ran.metrics.prefill_time, ran.metrics.decode_time)
    assert (queued.num_prompt_tokens, queued.num_generation_tokens, queued.max_tokens, queued.finish_reasons) == \
        (3, 0, 7, ("abort",) * 3)
    # never scheduled: no queue or prefill time, but it did arrive and finish
    assert queued.metrics.time_in_queue is None and queued.metrics.prefill_time is None
    assert queued.metrics.e2e_latency is not None

    exported = {(s.name, s.labels.get("finished_reason")): s.value
                for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}
    assert exported[(P + "request_success_total", "abort")] == 2 + 3
    assert exported[(P + "e2e_request_latency_seconds_count", None)] == 2
    assert exported[(P + "request_queue_time_seconds_count", None)] == 1    # the queued one never left the queue
    assert exported[(P + "request_decode_time_seconds_count", None)] == 1
    assert exported[(P + "iteration_tokens_total_sum", None)] == 5 + 2   # the step, not the abort
    assert exported[(P + "iteration_tokens_total_count", None)] == 1
