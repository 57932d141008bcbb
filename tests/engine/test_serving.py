"""The serving core: continuous batching, chunked prefill, prefix caching, preemption, n > 1,
priorities, prompt logprobs, metrics and admission checks, on a tiny random Llama (CPU).

Greedy tokens must be identical however requests are batched, chunked, cached or preempted: the
reference is each prompt run alone, itself checked against transformers in test_generate.py.
"""

from __future__ import annotations

import random

import pytest
import torch

from lepton.engine.engine import Engine
from lepton.sampling_params import RequestOutputKind, SamplingParams
from tests.engine import checkpoint
from tests.models.conftest import load_hf_model

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
_rng = random.Random(0)
SHARED = [_rng.randrange(3, 390) for _ in range(37)]            # a common 37-token prefix
PROMPTS = [[_rng.randrange(3, 390) for _ in range(n)] for n in (3, 17, 40, 70, 5, 33)] + \
          [SHARED + [_rng.randrange(3, 390) for _ in range(n)] for n in (2, 9, 20)]
PER_TOKEN = 2 * 2 * 2 * 64 * 4   # K+V, 2 layers, 2 kv heads, head_dim 64, float32


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return checkpoint(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def engine(path):
    return Engine(path, device="cpu", max_model_len=128)


@pytest.fixture(scope="module")
def alone(engine):
    return [engine.generate(p, GREEDY)[0].outputs[0].token_ids for p in PROMPTS]


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def assert_idle(engine: Engine) -> None:
    bm = engine.core.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks and bm.usage == 0
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting) == (0, 0) and not engine.has_unfinished_requests()


def drive(engine: Engine, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]]) -> dict:
    """Step the engine, adding arrivals[k] before step k; final outputs by request id."""
    finals, k = {}, 0
    while k <= max(arrivals) or engine.has_unfinished_requests():
        for rid, prompt, params in arrivals.get(k, []):
            engine.add_request(rid, prompt, params)
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        k += 1
    return finals


def test_all_at_once_equals_one_at_a_time(engine, alone):
    assert tokens(engine.generate(PROMPTS, GREEDY)) == alone
    assert_idle(engine)


def test_requests_arriving_while_others_decode(engine, alone):
    arrivals = {0: [("a0", PROMPTS[0], GREEDY), ("a3", PROMPTS[3], GREEDY)],
                3: [(f"a{i}", PROMPTS[i], GREEDY) for i in (1, 2, 6)],
                7: [(f"a{i}", PROMPTS[i], GREEDY) for i in (4, 5, 7, 8)]}
    finals = drive(engine, arrivals)
    assert [finals[f"a{i}"].outputs[0].token_ids for i in range(len(PROMPTS))] == alone
    assert_idle(engine)


@pytest.mark.parametrize("kwargs", [dict(max_num_batched_tokens=8, max_num_seqs=4, block_size=8),
                                    dict(max_num_batched_tokens=16, max_num_seqs=1),
                                    dict(enable_prefix_caching=False)])
def test_chunked_prefill_and_limits_change_nothing(path, alone, kwargs):
    small = Engine(path, device="cpu", max_model_len=128, **kwargs)
    assert tokens(small.generate(PROMPTS, GREEDY)) == alone
    assert_idle(small)


def test_preemption_by_recompute(path, alone):
    # 24 blocks of 4 tokens: all nine requests (up to 80 tokens each) cannot run at once.
    tiny = Engine(path, device="cpu", max_model_len=96, block_size=4, kv_cache_memory=PER_TOKEN * 96)
    assert tiny.core.block_manager.num_blocks == 24
    outs = tiny.generate(PROMPTS, GREEDY)
    assert tokens(outs) == alone
    assert tiny.stats().num_preemptions > 0
    assert sum(o.metrics.num_preemptions for o in outs) == tiny.stats().num_preemptions
    assert_idle(tiny)


def test_prefix_cache_serves_repeated_prefixes(path, alone):
    cached = Engine(path, device="cpu", max_model_len=128)
    first = cached.generate(PROMPTS[6:], GREEDY)
    second = cached.generate(PROMPTS[6:], GREEDY)
    assert tokens(first) == tokens(second) == alone[6:]
    assert all(o.num_cached_tokens >= 32 for o in second)      # 37 shared tokens = 2 full blocks
    assert cached.stats().prefix_cache_hit_rate > 0
    assert_idle(cached)
    off = Engine(path, device="cpu", max_model_len=128, enable_prefix_caching=False)
    off.generate(PROMPTS[6:], GREEDY)
    assert all(o.num_cached_tokens == 0 for o in off.generate(PROMPTS[6:], GREEDY))


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_n_samples_share_the_prompt_blocks(path, alone, prefix_caching):
    eng = Engine(path, device="cpu", max_model_len=128, enable_prefix_caching=prefix_caching)
    copies = []
    real_copy = eng.executor.runner.copy_blocks
    eng.executor.runner.copy_blocks = lambda pairs: (copies.extend(pairs), real_copy(pairs))
    outs = eng.generate(PROMPTS[1:4], SamplingParams(n=3, temperature=0, max_tokens=10, ignore_eos=True))
    for out, ref in zip(outs, alone[1:4]):
        assert [c.index for c in out.outputs] == [0, 1, 2]
        assert all(c.token_ids == ref for c in out.outputs)   # three writers of one shared block
    assert copies, "the shared partial prompt block was never copied before a write"
    seeded = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True)
    a, b = eng.generate(PROMPTS[2], seeded)[0], eng.generate(PROMPTS[2], seeded)[0]
    assert tokens([a]) == tokens([b]) and a.outputs[0].token_ids != a.outputs[1].token_ids
    assert_idle(eng)


def test_priority_and_fcfs_order(path):
    eng = Engine(path, device="cpu", max_model_len=128, max_num_seqs=1)
    for rid, prio in (("low", 5), ("high", 0), ("mid", 1), ("mid2", 1)):
        eng.add_request(rid, PROMPTS[0], SamplingParams(temperature=0, max_tokens=3), priority=prio)
    order = []
    while eng.has_unfinished_requests():
        order += [o.request_id for o in eng.step() if o.finished]
    assert order == ["high", "mid", "mid2", "low"]


def test_abort_mid_generation_frees_blocks(engine):
    engine.add_request("x", PROMPTS[3], GREEDY)
    engine.add_request("y", PROMPTS[4], GREEDY)
    engine.step()
    engine.step()
    assert engine.core.block_manager.usage > 0
    (out,) = engine.abort("x")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert engine.abort("x") == [] and engine.abort("never-added") == []
    engine.abort("y")
    assert_idle(engine)


def test_prompt_logprobs_match_transformers(path):
    eng = Engine(path, device="cpu", max_model_len=128, max_num_batched_tokens=16, max_num_seqs=4)
    hf = load_hf_model(path)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
    for run in range(2):   # the second run must not take the prompt from the prefix cache
        outs = eng.generate([PROMPTS[3], PROMPTS[1]], params)
        for out in outs:
            ids = out.prompt_token_ids
            with torch.no_grad():
                ref = hf(torch.tensor([ids])).logits[0, :-1].double().log_softmax(-1)
            assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
            assert out.num_cached_tokens == 0
            for pos in range(1, len(ids)):
                entry = out.prompt_logprobs[pos]
                expected = ref[pos - 1]
                assert entry[ids[pos]].logprob == pytest.approx(expected[ids[pos]].item(), abs=1e-4)
                assert entry[ids[pos]].rank == int((expected > expected[ids[pos]]).sum()) + 1
                assert set(expected.topk(3).indices.tolist()) <= set(entry)
    assert_idle(eng)


def test_nan_logits_end_only_that_request(path, alone):
    eng = Engine(path, device="cpu", max_model_len=128)
    real = eng.model.compute_logits
    calls = {"n": 0}

    def poisoned(hidden):
        logits = real(hidden)
        calls["n"] += 1
        if calls["n"] == 3:        # a decode step: row 0 is the first request
            logits[0] = float("nan")
        return logits

    eng.model.compute_logits = poisoned
    outs = eng.generate(PROMPTS[:2], GREEDY)
    assert outs[0].outputs[0].finish_reason == "error"
    assert outs[0].outputs[0].token_ids == alone[0][:len(outs[0].outputs[0].token_ids)]
    assert outs[1].outputs[0].token_ids == alone[1] and outs[1].outputs[0].finish_reason == "length"
    assert_idle(eng)


def test_metrics_and_stats(engine):
    outs = engine.generate(PROMPTS[:3], GREEDY)
    for out in outs:
        m = out.metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time
        assert m.last_token_time <= m.finished_time and m.ttft > 0 and m.e2e_latency >= m.ttft
        assert len(m.inter_token_latencies) == len(out.outputs[0].token_ids) - 1
    stats = engine.stats()
    assert stats.num_generation_tokens >= 30 and stats.num_prompt_tokens > 0
    assert stats.num_requests_finished >= 3
    assert_idle(engine)


def test_step_outputs_cumulative_and_delta(engine, alone):
    params = {kind: SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, output_kind=kind)
              for kind in RequestOutputKind}
    for kind, p in params.items():
        engine.add_request(kind.name, PROMPTS[2], p)
    seen = {kind.name: [] for kind in RequestOutputKind}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    cumulative, delta, final = seen["CUMULATIVE"], seen["DELTA"], seen["FINAL_ONLY"]
    assert len(final) == 1 and final[0].outputs[0].token_ids == alone[2]
    assert len(cumulative) == 10 and [len(o.outputs[0].token_ids) for o in cumulative] == list(range(1, 11))
    assert sum((o.outputs[0].token_ids for o in delta), []) == alone[2]
    assert "".join(o.outputs[0].text for o in delta) == cumulative[-1].outputs[0].text == final[0].outputs[0].text
    assert [o.finished for o in delta] == [False] * (len(delta) - 1) + [True]


def test_admission_rejects_what_can_never_run(engine):
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("big", PROMPTS[3], SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="logit_bias"):
        engine.add_request("bias", PROMPTS[0], SamplingParams(logit_bias={10**6: 1.0}))
    engine.add_request("dup", PROMPTS[0], GREEDY)
    with pytest.raises(ValueError, match="already in flight"):
        engine.add_request("dup", PROMPTS[0], GREEDY)
    engine.abort("dup")
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("", PROMPTS[0], GREEDY)
    assert_idle(engine)


@pytest.mark.parametrize("kwargs,name", [
    (dict(block_size=12), "block_size"), (dict(block_size=512), "block_size"),
    (dict(block_size=32, max_num_batched_tokens=16), "max_num_batched_tokens"),
    (dict(max_num_seqs=64, max_num_batched_tokens=32), "max_num_seqs"),
])
def test_engine_config_checks(path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        Engine(path, device="cpu", **kwargs)


def test_sampling_modes_through_the_engine(engine, alone):
    """temperature 0 and top_k=1 are greedy; unseeded runs differ; min_tokens holds eos back."""
    assert tokens(engine.generate(PROMPTS[:3], SamplingParams(temperature=0, top_p=0.5, max_tokens=10,
                                                             ignore_eos=True))) == alone[:3]
    assert tokens(engine.generate(PROMPTS[:3], SamplingParams(temperature=1.3, top_k=1, max_tokens=10,
                                                             ignore_eos=True))) == alone[:3]
    free = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    assert tokens(engine.generate(PROMPTS[:3], free)) != tokens(engine.generate(PROMPTS[:3], free))
    saved = engine.eos_token_ids
    try:
        engine.eos_token_ids = {alone[2][0]}     # the first greedy token ends the sequence ...
        (early,) = engine.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=10))
        assert early.outputs[0].token_ids == alone[2][:1] and early.outputs[0].finish_reason == "stop"
        # ... unless min_tokens bans it for the first 4 tokens
        (held,) = engine.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=10, min_tokens=4))
        assert len(held.outputs[0].token_ids) >= 4 and alone[2][0] not in held.outputs[0].token_ids[:4]
    finally:
        engine.eos_token_ids = saved
    assert_idle(engine)


def test_offline_progress_bar(engine, capsys):
    engine.generate(PROMPTS[:4], GREEDY, use_tqdm=True)
    err = capsys.readouterr().err
    assert "Processed prompts" in err and "4/4" in err and "output:" in err and "toks/s" in err
    engine.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
    assert "Processed prompts" not in capsys.readouterr().err


def test_max_num_seqs_counts_every_sample_of_a_request(path):
    eng = Engine(path, device="cpu", max_model_len=128, max_num_seqs=5)
    with pytest.raises(ValueError, match="max_num_seqs"):
        eng.add_request("too-wide", PROMPTS[0], SamplingParams(n=6, max_tokens=2))
    for i in range(3):
        eng.add_request(f"n4-{i}", PROMPTS[i], SamplingParams(n=4, temperature=1.0, max_tokens=6, ignore_eos=True))
    peak = 0
    while eng.has_unfinished_requests():
        eng.step()
        peak = max(peak, len(eng.core.scheduler.running))
    assert peak == 4     # one n=4 request at a time: two would be 8 > 5
    assert_idle(eng)


def test_preemption_takes_the_lowest_priority_first(path):
    # 20 blocks of 4 tokens; a low-priority request decodes while a high-priority long prompt is
    # prefilled in chunks: when blocks run out, the low-priority one must give way.
    eng = Engine(path, device="cpu", max_model_len=80, block_size=4, kv_cache_memory=PER_TOKEN * 80,
                 max_num_batched_tokens=8, max_num_seqs=4)
    eng.add_request("low", PROMPTS[1], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), priority=9)
    for _ in range(4):
        eng.step()
    eng.add_request("high", PROMPTS[3][:60], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                    priority=0)
    finals = {}
    while eng.has_unfinished_requests():
        finals.update({o.request_id: o for o in eng.step() if o.finished})
    assert finals["high"].metrics.num_preemptions == 0 and finals["low"].metrics.num_preemptions >= 1
    assert_idle(eng)


def test_stop_token_text_is_not_in_the_output(engine, alone):
    stop = alone[2][5]
    (out,) = engine.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop]))
    ids = out.outputs[0].token_ids
    assert ids[-1] == stop and out.outputs[0].stop_reason == stop
    assert out.outputs[0].text == engine.tokenizer.decode(ids[:-1], skip_special_tokens=True)
    (kept,) = engine.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop],
                                                         include_stop_str_in_output=True))
    assert kept.outputs[0].text == engine.tokenizer.decode(ids, skip_special_tokens=True)


def test_generate_leaves_other_requests_alone(engine, alone):
    engine.add_request("0", PROMPTS[0], GREEDY)
    assert tokens(engine.generate(PROMPTS[:2], GREEDY)) == alone[:2]
    finals = drive(engine, {0: []})                # "0" was not generate's to collect or abort
    assert finals["0"].outputs[0].token_ids == alone[0]
    assert_idle(engine)


def test_block_copies_that_chain_run_in_order(engine, monkeypatch):
    """(A -> B) then (C -> A) in one step: B must get A's old content, A then C's. A kernel that
    copies every pair at once (the CUDA extension) could read A after writing it, so chained
    copies are issued one call each, in order; independent ones in a single call."""
    import lepton_kernels

    calls = []
    real = lepton_kernels.copy_blocks
    monkeypatch.setattr("lepton.model_executor.model_runner.lk.copy_blocks",
                        lambda k, v, mapping: (calls.append(mapping.tolist()), real(k, v, mapping)))
    data = engine.executor.runner.kv_cache.data
    saved = data[:, :, :4].clone()
    try:
        for b in range(4):
            data[:, :, b] = float(b + 1)
        engine.executor.runner.copy_blocks([(0, 1), (2, 0)])
        assert calls == [[[0, 1]], [[2, 0]]]
        assert torch.all(data[:, :, 1] == 1) and torch.all(data[:, :, 0] == 3)
        calls.clear()
        engine.executor.runner.copy_blocks([(2, 3), (0, 1)])
        assert calls == [[[2, 3], [0, 1]]]
    finally:
        data[:, :, :4] = saved


def test_synchronous_stream(engine, alone):
    delta = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    outs = list(engine.stream(PROMPTS[2], delta))
    assert sum((o.outputs[0].token_ids for o in outs), []) == alone[2]
    text = engine.generate(PROMPTS[2], GREEDY)[0].outputs[0].text
    assert "".join(o.outputs[0].text for o in outs) == text and outs[-1].finished
    with pytest.raises(ValueError, match="empty"):
        engine.stream([], GREEDY)
    for i, out in enumerate(engine.stream(PROMPTS[3], SamplingParams(max_tokens=50, ignore_eos=True))):
        if i == 2:
            break                    # closing the generator aborts the request
    assert len(out.outputs[0].token_ids) == 3
    assert_idle(engine)
