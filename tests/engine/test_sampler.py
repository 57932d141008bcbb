"""The batched sampler against float64 math written here and transformers' logits processors."""

from __future__ import annotations

import math
from dataclasses import fields

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from lepton.engine.sampler import SamplingRow, _top_k_top_p, compute_logprobs, sample, sample_batch
from lepton.engine.sampling_metadata import SamplingMetadata, seed_key
from lepton.sampling_params import RequestOutputKind, SamplingParams

TINY = [1.2, 1.0, 0.7, 0.3, 0.0, -0.4, -0.9, -1.5]   # the fixed distribution, in logits


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draw(logits: torch.Tensor, params: list[SamplingParams], generator=None, eos=None, **kw):
    """sample_batch with metadata from_params (kw: seeds, steps, prompt/output token ids)."""
    md = SamplingMetadata.from_params(params, device="cpu", **kw)
    return sample_batch(logits, md, generator, None if eos is None else torch.tensor(eos))


def reference_probs(logits, temperature: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """float64: softmax(z / T), then top_k, top_p and min_p, each renormalizing."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_k > 0:
        p = np.where(z >= np.sort(z)[::-1][top_k - 1], p, 0)
        p /= p.sum()
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    cut = np.zeros_like(p)
    cut[order[before < top_p]] = 1
    p = p * cut / (p * cut).sum()
    p = np.where(p >= min_p * p.max(), p, 0)
    return p / p.sum()


MASK = 2**64 - 1


def splitmix64(x: int) -> int:
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def reference_noise(seed: int, step: int, vocab: int) -> np.ndarray:
    """The documented stream in Python integers: E_t = -log U_t for seed in [0, 2**64)."""
    golden, odd = 0x9E3779B97F4A7C15, 0xD6E8FEB86659FD93
    key = splitmix64((splitmix64((seed + golden) & MASK) + step * odd) & MASK)
    return np.array([-math.log(((splitmix64((key + t * golden) & MASK) >> 12) + 0.5) / 2**52)
                     for t in range(vocab)])


def hf_kept(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """transformers' warpers in generate()'s order, on float64: the mask of tokens left."""
    scores = logits.double()[None] if logits.dim() == 1 else logits.double()
    warpers = [TemperatureLogitsWarper(temperature)]
    warpers += [TopKLogitsWarper(top_k)] if top_k > 0 else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    warpers += [MinPLogitsWarper(min_p)] if min_p > 0 else []
    for warper in warpers:
        scores = warper(None, scores)
    return scores.isfinite().squeeze(0)


FILTERS = [(1.0, -1, 1.0, 0.0), (0.7, -1, 1.0, 0.0), (1.3, 3, 1.0, 0.0), (1.0, -1, 0.8, 0.0),
           (0.8, 5, 0.75, 0.0), (1.0, -1, 1.0, 0.15), (1.5, 6, 0.9, 0.1)]


@pytest.mark.parametrize("mode", ["sorted", "candidates", "seeds", "steps"])
@pytest.mark.parametrize("temperature,top_k,top_p,min_p", FILTERS)
def test_sampled_frequencies(mode, temperature, top_k, top_p, min_p):
    """Sorted: V = 8, so a full sort; candidates: the 8 tokens at scattered ids among 3000, the
    rest -inf (top-64 candidates); seeds: the same with -1e4, every row seeded with its own seed
    (near 2**64 too); steps: one seed, every row at its own step."""
    expected = reference_probs(TINY, temperature, top_k, top_p, min_p)
    assert torch.equal(hf_kept(torch.tensor(TINY), temperature, top_k, top_p, min_p),
                       torch.from_numpy(expected > 0))
    vocab, count = {"sorted": len(TINY)}.get(mode, 3000), 4000
    ids = torch.randperm(vocab, generator=seeded(vocab))[:len(TINY)]
    logits = torch.full((vocab,), -1e4 if mode in ("seeds", "steps") else float("-inf"))
    logits[ids] = torch.tensor(TINY)
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)] * count
    kw = {"seeds": dict(seeds=[(2**64 - 1 - i) if i % 2 else 1000 + i for i in range(count)], steps=[3] * count),
          "steps": dict(seeds=[12345] * count, steps=range(count))}.get(mode, {})
    out = draw(logits.expand(count, vocab), params, seeded(7), **kw)
    position = {token: i for i, token in enumerate(ids.tolist())}
    assert all(out.finite) and all(token in position for token in out.token_ids)
    counts = np.bincount([position[t] for t in out.token_ids], minlength=len(TINY))
    assert not counts[expected == 0].any()
    kept = expected > 0
    assert chisquare(counts[kept], count * expected[kept]).pvalue > 1e-3


@pytest.mark.parametrize("rounded", [False, True], ids=["float", "bf16-ties"])
@pytest.mark.parametrize("top_k,top_p", [(-1, 0.9), (50, 1.0), (300, 0.8), (-1, 0.5), (10, 0.3), (1500, 0.95),
                                         ("mixed", "mixed")])
def test_top_k_top_p_threshold_matches_transformers(top_k, top_p, rounded):
    """Every search stage (top 64, top 1024, full sort) keeps exactly what transformers keeps."""
    vocab = 6000
    scales = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 10.0]).repeat_interleave(2)
    s = torch.randn(len(scales), vocab, generator=seeded(len(str(top_k)))) * scales[:, None]
    s = s.bfloat16().float() if rounded else s   # bf16 logits tie a lot, also at the thresholds
    if top_k == "mixed":
        pairs = [(-1, 0.9), (40, 1.0), (5, 0.5), (-1, 0.3), (900, 0.99), (2, 0.95), (-1, 0.99)] * 2
    else:
        pairs = [(top_k, top_p)] * len(scales)
    md = SamplingMetadata.from_params([SamplingParams(top_k=k, top_p=p) for k, p in pairs], device="cpu")
    pools = _top_k_top_p(s, s.amax(dim=-1), None, md.top_k, md.top_p)
    rows = [list(range(len(s))) if pool.rows is None else pool.rows.tolist() for pool in pools]
    assert sorted(sum(rows, [])) == list(range(len(scales)))
    for pool, pool_rows in zip(pools, rows):
        for position, r in enumerate(pool_rows):
            kept = s[r] >= pool.threshold[position]
            hf = hf_kept(s[r], 1.0, *pairs[r], 0.0)
            # transformers' top_p may cut through a group of tied tokens; lepton keeps the whole group.
            assert torch.equal(kept, hf if not rounded else s[r] >= s[r][hf].min()), \
                f"row {r} width {pool.values.shape[1]}"
            # every kept token is among the row's candidates
            assert set(kept.nonzero()[:, 0].tolist()) <= set(pool.ids[position].tolist())
    if top_k == -1:
        assert {pool.values.shape[1] for pool in pools} == {64, 1024, vocab}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_equals_top_k_1_and_temperature_0(dtype):
    logits = torch.randn(32, 200, generator=seeded(3), dtype=torch.float64)
    logits[torch.arange(32), logits.argmax(dim=1)] += 0.5   # a top token that bf16 does not tie
    logits = logits.to(dtype)
    expected = logits.double().numpy().argmax(axis=1).tolist()
    for params in [dict(temperature=0), dict(temperature=1e-6), dict(top_k=1), dict(top_k=1, temperature=2.0)]:
        assert draw(logits, [SamplingParams(**params)] * 32, seeded(0)).token_ids == expected, params
    # greedy and top_k=1 rows mixed, some seeded
    mixed = [SamplingParams(temperature=0), SamplingParams(top_k=1, seed=3)] * 16
    assert draw(logits, mixed, seeded(0)).token_ids == expected


def reference_processed(logits: torch.Tensor, p: SamplingParams, prompt, output, eos: list[int]) -> torch.Tensor:
    """float64 min_tokens, logit_bias, transformers' repetition penalty, OpenAI's penalties."""
    z = logits.double().clone()
    if len(output) < p.min_tokens:
        z[p.stop_token_ids + ([] if p.ignore_eos else eos)] = float("-inf")
    for token, value in (p.logit_bias or {}).items():
        z[token] += value
    seen = list(prompt) + list(output)
    if seen:
        z = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([seen]), z[None])[0]
    counts = torch.bincount(torch.tensor(list(output), dtype=torch.long), minlength=len(z))
    return z - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)


def test_processors_change_greedy_choices_as_the_reference():
    vocab, eos = 40, [0, 1]
    gen = np.random.default_rng(0)
    logits = torch.randn(300, vocab, generator=seeded(5)) * 0.7
    params, prompts, outputs = [], [], []
    for i in range(300):
        # Tokens near the top of the row, so the penalties move the argmax.
        top = logits[i].topk(6).indices.numpy()
        bias = {int(t): float(gen.normal()) for t in gen.choice(vocab, 2)} if i % 3 == 0 else None
        prompts.append(gen.choice(top, 3).tolist())
        outputs.append(gen.choice(top, gen.integers(0, 8)).tolist())
        params.append(SamplingParams(temperature=0, repetition_penalty=float(gen.choice([1.0, 0.7, 1.3, 2.0])),
                                     presence_penalty=float(gen.choice([0.0, 0.5, -0.3])),
                                     frequency_penalty=float(gen.choice([0.0, 0.4, 1.5])), logit_bias=bias,
                                     min_tokens=int(gen.integers(0, 5)),
                                     stop_token_ids=[int(top[0])] if i % 4 == 0 else None,
                                     ignore_eos=i % 5 == 0, max_tokens=None))
    before = logits.clone()
    got = draw(logits, params, eos=eos, prompt_token_ids=prompts, output_token_ids=outputs).token_ids
    assert torch.equal(logits, before), "the caller's logits must stay untouched"
    expected = [int(reference_processed(logits[i], params[i], prompts[i], outputs[i], eos).argmax())
                for i in range(300)]
    assert got == expected
    assert sum(g != int(z.argmax()) for g, z in zip(got, logits)) > 100   # the processors did matter


def test_crafted_processor_cases():
    z = torch.tensor([[5.0, 4.9, 4.0, 0.0, -1.0]])

    def greedy(prompt=(), output=(), logits=z, **kw) -> int:
        params = [SamplingParams(temperature=0, max_tokens=None, **kw)]
        return draw(logits, params, eos=[0], prompt_token_ids=[prompt], output_token_ids=[output]).token_ids[0]

    assert greedy() == 0
    assert greedy(output=[0], frequency_penalty=0.2) == 1           # 5 - 0.2 < 4.9
    assert greedy(output=[0], frequency_penalty=0.05) == 0
    assert greedy(output=[0, 0], frequency_penalty=0.06) == 1       # counted twice
    assert greedy(output=[0, 0], presence_penalty=0.06) == 0        # counted once
    assert greedy(prompt=[0], repetition_penalty=1.1) == 1          # 5 / 1.1 < 4.9
    assert greedy(logit_bias={"3": 5.5}) == 3                       # JSON-style key
    assert greedy(logit_bias={2: 1.5, 0: -1}) == 2
    assert greedy(min_tokens=2, output=[1]) == 1                    # eos banned while < 2 tokens
    assert greedy(min_tokens=2, output=[1, 1]) == 0
    assert greedy(min_tokens=2, ignore_eos=True) == 0
    assert greedy(min_tokens=2, ignore_eos=True, stop_token_ids=[0, 1]) == 2
    assert greedy(min_tokens=2, stop_token_ids=[1, 99]) == 2        # ids past the vocabulary: no-ops
    assert greedy(prompt=[77, 0], repetition_penalty=1.1) == 1
    # A negative logit is multiplied: -1 * 1.1 < -1.05.
    assert greedy(logits=torch.tensor([[-1.0, -1.05, -3.0]]), output=[0], repetition_penalty=1.1) == 1
    with pytest.raises(ValueError, match="logit_bias"):
        greedy(logit_bias={5: 1.0})


def reference_race(logits: torch.Tensor, seed: int, step: int, temperature: float, top_k: int = -1,
                   top_p: float = 1.0, min_p: float = 0.0) -> int:
    """float64: argmax over the kept tokens of p_i / E_i with E from the documented stream."""
    p = reference_probs(logits.numpy(), temperature, top_k, top_p, min_p)
    return int(np.argmax(p / reference_noise(seed, step, len(p))))


@pytest.mark.parametrize("params", [dict(temperature=0.9, top_p=0.95), dict(temperature=1.1, top_k=20),
                                    dict(temperature=1.0), dict(temperature=0.7, min_p=0.1, top_p=0.99),
                                    dict(temperature=2.0, top_k=400, top_p=0.9)])
def test_seeded_row_depends_on_seed_step_and_logits_alone(params):
    """The documented hash stream's race in float64, whatever the batch, the row's place in it,
    the candidate stage of its mates, or how often it is asked."""
    vocab, seed = 1000, 2**64 - 12345
    logits = torch.randn(vocab, generator=seeded(42)) * 2
    target = SamplingParams(seed=seed, **params)
    mates = [SamplingParams(seed=99, temperature=1.3, top_k=700), SamplingParams(temperature=0.5, top_p=0.7),
             SamplingParams(temperature=0, logprobs=3), SamplingParams(seed=5, min_p=0.2),
             SamplingParams(temperature=1.0, repetition_penalty=1.5), SamplingParams(top_p=0.999, seed=2**63)]
    expected = [reference_race(logits, seed, step, **params) for step in range(6)]
    assert len(set(expected)) > 1
    for step in range(6):
        assert draw(logits[None], [target], steps=[step]).token_ids == [expected[step]]
        for where, size in ((0, 3), (2, 7), (5, 7), (30, 41)):
            others = torch.randn(size - 1, vocab, generator=seeded(where + step)) * 3
            batch = torch.cat([others[:where], logits[None], others[where:]])
            rows = [mates[i % len(mates)] for i in range(size - 1)]
            rows.insert(where, target)
            outputs = [[1, 2, 3]] * size
            steps = [step if i == where else i for i in range(size)]
            for _ in range(2):
                out = draw(batch, rows, seeded(step), steps=steps, prompt_token_ids=[[0]] * size,
                           output_token_ids=outputs)
                assert out.token_ids[where] == expected[step], (step, where, size)


def test_unseeded_rows_follow_the_shared_generator():
    logits = torch.randn(16, 500, generator=seeded(2))
    params = [SamplingParams(temperature=1.0, top_p=0.9)] * 16
    first = draw(logits, params, seeded(1)).token_ids
    assert draw(logits, params, seeded(1)).token_ids == first
    assert draw(logits, params, seeded(2)).token_ids != first


@pytest.mark.parametrize("bad", ["nan", "+inf", "-inf"])
def test_non_finite_rows_leave_the_others_alone(bad):
    vocab = 300
    logits = torch.randn(4, vocab, generator=seeded(8))
    good = [SamplingParams(seed=1, temperature=0.8, top_p=0.9, logprobs=2), SamplingParams(temperature=0, logprobs=0),
            SamplingParams(seed=2, temperature=1.2), SamplingParams(seed=3, top_k=5, min_p=0.1)]
    clean = draw(logits, good, steps=[4] * 4)
    poison = torch.randn(2, vocab, generator=seeded(9))
    if bad == "nan":
        poison[:, 17] = float("nan")
    elif bad == "+inf":
        poison[:, 3] = float("inf")
    else:
        poison[:] = float("-inf")
    mixed = torch.cat([poison[:1], logits[:2], poison[1:], logits[2:]])
    bad_rows = [SamplingParams(temperature=0.9, logprobs=3), SamplingParams(seed=7, temperature=0, presence_penalty=1.0)]
    rows = bad_rows[:1] + good[:2] + bad_rows[1:] + good[2:]
    before = mixed.clone()
    out = draw(mixed, rows, seeded(0), steps=[4] * 6, prompt_token_ids=[[]] * 6, output_token_ids=[[1]] * 6)
    assert torch.equal(mixed.isnan(), before.isnan()) and torch.equal(mixed.nan_to_num(), before.nan_to_num())
    assert out.finite == [False, True, True, False, True, True]
    assert out.token_ids[0] == out.token_ids[3] == 0 and np.isfinite(out.logprobs[0])   # zeros, not NaN
    assert out.sampled_token_ids.tolist() == out.token_ids
    kept = [1, 2, 4, 5]
    for name in ("token_ids", "logprobs", "ranks", "top_ids", "top_logprobs"):
        assert [getattr(out, name)[i] for i in kept] == getattr(clean, name), name


def reference_logprob_stats(logits: torch.Tensor, token: int, num_top: int):
    lp = logits.double().log_softmax(-1)
    order = lp.argsort(descending=True)[:num_top]
    return float(lp[token]), int((lp > lp[token]).sum()) + 1, order.tolist(), lp[order].tolist()


def test_logprobs_are_of_the_raw_distribution():
    logits = torch.randn(6, 50, generator=seeded(4)) * 3
    asked = [None, 0, 3, 7, 2, 5]
    params = [SamplingParams(seed=i, temperature=[0, 0.8][i % 2], logprobs=n, top_k=[-1, 4][i % 2],
                             frequency_penalty=0.5, logit_bias={3: 2.0}) for i, n in enumerate(asked)]
    out = draw(logits, params, prompt_token_ids=[[]] * 6, output_token_ids=[[0, 1, 2]] * 6)
    for i, n in enumerate(asked):
        if n is None:
            assert out.logprobs[i] is out.ranks[i] is out.top_ids[i] is out.top_logprobs[i] is None
            continue
        value, rank, ids, lps = reference_logprob_stats(logits[i], out.token_ids[i], n)
        assert out.logprobs[i] == pytest.approx(value, abs=1e-5) and out.ranks[i] == rank
        assert out.top_ids[i] == ids and out.top_logprobs[i] == pytest.approx(lps, abs=1e-5)


def test_compute_logprobs():
    logits = torch.randn(7, 40, generator=seeded(6)) * 2
    tokens = torch.randint(0, 40, (7,), generator=seeded(7))
    values, ranks, top_ids, top_lps = compute_logprobs(logits, tokens, 3)
    for t in range(7):
        value, rank, ids, lps = reference_logprob_stats(logits[t], int(tokens[t]), 3)
        assert values[t] == pytest.approx(value, abs=1e-5) and ranks[t] == rank
        assert top_ids[t] == ids and top_lps[t] == pytest.approx(lps, abs=1e-5)
    assert compute_logprobs(logits, tokens, 0)[2] == [[]] * 7


def test_from_params_matches_hand_built_metadata():
    params = [SamplingParams(temperature=0), SamplingParams(top_k=5, seed=2**64 - 1, logprobs=2),
              SamplingParams(top_p=0.5, min_tokens=3, stop_token_ids=[7, 8], ignore_eos=True, logit_bias={4: 1.5}),
              SamplingParams(min_p=0.2, frequency_penalty=0.5, seed=9)]
    md = SamplingMetadata.from_params(params, device="cpu", prompt_token_ids=[[1], [2, 3], [], [4]],
                                      output_token_ids=[[5], [], [6], [7, 7]])
    t = torch.tensor
    hand = SamplingMetadata(
        temperature=t([0.0, 1, 1, 1]), all_greedy=False, all_random=False, top_k=t([0, 5, 0, 0]),
        top_p=t([1.0, 1, 0.5, 1]), min_p=t([0.0, 0, 0, 0.2]), seeds=t([0, -1, 0, 9]), seeded=t([False, True, False, True]),
        steps=t([1, 0, 1, 2]), min_tokens=t([0, 0, 3, 0]), stop_token_ids=t([[-1, -1], [-1, -1], [7, 8], [-1, -1]]),
        ignore_eos=t([False, False, True, False]), logit_bias=(t([2]), t([4]), t([1.5])),
        token_ids=t([[1, 5, 0], [2, 3, 0], [6, 0, 0], [4, 7, 7]]), prompt_lens=t([1, 2, 0, 1]),
        seq_lens=t([2, 2, 1, 3]), frequency_penalty=t([0.0, 0, 0, 0.5]), num_logprobs=[-1, 2, -1, -1])
    for f in fields(SamplingMetadata):
        got, want = getattr(md, f.name), getattr(hand, f.name)
        if isinstance(want, torch.Tensor):
            assert got.dtype == want.dtype and torch.equal(got, want), f.name
        elif isinstance(want, tuple):
            assert all(g.dtype == w.dtype and torch.equal(g, w) for g, w in zip(got, want)), f.name
        else:
            assert got == want, f.name
    logits = torch.randn(4, 30, generator=seeded(1))
    assert sample_batch(logits, hand, seeded(3)).token_ids == sample_batch(logits, md, seeded(3)).token_ids
    plain = SamplingMetadata.from_params([SamplingParams()] * 2, device="cpu")
    assert all(getattr(plain, f.name) is None for f in fields(SamplingMetadata)[3:])


def test_seed_key_and_the_row_adapter():
    assert [seed_key(s) for s in (0, 2**63 - 1, 2**63, 2**64 - 1, -5)] == [0, 2**63 - 1, -2**63, -1, -5]
    for bad in (2**64, -2**63 - 1, 1.0, True):
        with pytest.raises(ValueError, match="seed"):
            seed_key(bad)
    logits = torch.randn(3, 100, generator=seeded(0))
    params = [SamplingParams(temperature=0.9, seed=2**64 - 1), SamplingParams(top_k=9), SamplingParams(top_p=0.8)]
    rows = [SamplingRow(params[0], seeded(2**64 - 1), [1], [2, 3]), SamplingRow(params[1], None, [], []),
            SamplingRow(params[2], seeded(77), [], [4])]
    got = sample(logits, rows, generator=seeded(5)).token_ids
    assert got == draw(logits, params, seeded(5), seeds=[2**64 - 1, None, 77], steps=[2, 0, 1]).token_ids


BAD_PARAMS = {
    "min_p": [-0.1, 1.5, float("nan"), "0.1"], "presence_penalty": [2.5, -2.01, float("nan")],
    "frequency_penalty": [3, True], "repetition_penalty": [0, -1.0, float("inf")],
    "logit_bias": [{-1: 1.0}, {"x": 1.0}, {"-3": 1.0}, {1.5: 1.0}, {1: float("nan")}, {1: float("inf")},
                   {1: "2"}, [1, 2]],
    "min_tokens": [-1, 17, 1.0], "prompt_logprobs": [-1, 2.0], "include_stop_str_in_output": [1],
    "output_kind": [1, "DELTA"],
}


@pytest.mark.parametrize("field,value", [(f, v) for f, values in BAD_PARAMS.items() for v in values])
def test_bad_sampling_params(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})   # max_tokens is 16


def test_sampling_params_defaults_and_conversions():
    p = SamplingParams()
    assert (p.min_p, p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 0.0, 1.0)
    assert (p.logit_bias, p.min_tokens, p.prompt_logprobs, p.include_stop_str_in_output) == (None, 0, None, False)
    assert p.output_kind is RequestOutputKind.CUMULATIVE and not p.needs_penalties
    assert SamplingParams(logit_bias={"5": 200, 7: -150, 2: 0.5}).logit_bias == {5: 100.0, 7: -100.0, 2: 0.5}
    assert SamplingParams(max_tokens=None, min_tokens=1000).min_tokens == 1000
    assert SamplingParams(max_tokens=4, min_tokens=4).min_tokens == 4
    assert SamplingParams(repetition_penalty=1.2).needs_penalties
    assert SamplingParams(output_kind=RequestOutputKind.DELTA).output_kind.value == 1
    assert [k.value for k in RequestOutputKind] == [0, 1, 2]


def test_seed_must_fit_a_generator():
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**64)
    SamplingParams(seed=2**64 - 1)
