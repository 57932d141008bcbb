"""The batched sampler against float64 math written here and transformers' logits processors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

import lepton_kernels as lk
from lepton_kernels.sampling import candidates

from lepton.engine.sampler import compute_logprobs, sample_batch
from lepton.engine.sampling_metadata import SamplingMetadata
from lepton.sampling_params import SamplingParams

TINY = [1.2, 1.0, 0.7, 0.3, 0.0, -0.4, -0.9, -1.5]   # the fixed distribution, in logits


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(params=["eager", "ext"])
def race_impl(request):
    """Runs a test with each implementation of lepton_kernels.sample_from_probs, the race."""
    why_not = lk.get_op("sample_from_probs").get_impl(request.param)
    if why_not is not None and (reason := why_not.why_not("cpu", torch.float32, explicit=True)):
        pytest.skip(f"{request.param}: {reason}")
    with lk.use(sample_from_probs=request.param):
        yield request.param


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


def reference_key(seed: int, step: int) -> int:
    """The documented stream key in Python integers, for seed in [0, 2**64): an unsigned value."""
    return splitmix64((seed + 0x9E3779B97F4A7C15) & MASK) ^ splitmix64((step + 0xD6E8FEB86659FD93) & MASK)


def reference_noise(seed: int, step: int, vocab: int) -> np.ndarray:
    """The documented stream in Python integers: E_t = -log U_t for seed in [0, 2**64)."""
    golden, key = 0x9E3779B97F4A7C15, reference_key(seed, step)
    return np.array([-math.log(((splitmix64((key + t * golden) & MASK) & (2**52 - 1)) + 0.5) / 2**52)
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
def test_sampled_frequencies(mode, temperature, top_k, top_p, min_p, race_impl):
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


MIXED = [(-1, 1.0, 0.2), (-1, 0.9, 0.05), (40, 1.0, 0.0), (5, 0.5, 0.0), (-1, 0.3, 0.0), (900, 0.99, 0.0),
         (2, 0.95, 0.0), (-1, 0.99, 0.0), (-1, 1.0, 0.2), (3, 1.0, 0.3), (-1, 0.9, 0.0), (40, 1.0, 0.0),
         (-1, 0.5, 0.0), (1200, 0.8, 0.01)]   # row i has scale SCALES[i]: flat rows first


@pytest.mark.parametrize("cut", [True, False], ids=["cut", "no-cut"])
@pytest.mark.parametrize("rounded", [False, True], ids=["float", "bf16-ties"])
@pytest.mark.parametrize("top_k,top_p", [(-1, 0.9), (50, 1.0), (300, 0.8), (-1, 0.5), (10, 0.3), (1500, 0.95),
                                         ("mixed", "mixed")])
def test_kept_tokens_match_transformers(top_k, top_p, rounded, cut, monkeypatch):
    """Every search stage (the cut; with it off, the top 64, top 1024, full sort; min_p alone
    over the whole vocabulary) keeps exactly what transformers keeps."""
    if not cut:
        monkeypatch.setattr(candidates, "CUT_WIDTH", 0)
    vocab = 6000
    scales = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 10.0]).repeat_interleave(2)
    s = torch.randn(len(scales), vocab, generator=seeded(len(str(top_k)))) * scales[:, None]
    s = s.bfloat16().float() if rounded else s   # bf16 logits tie a lot, also at the thresholds
    triples = MIXED if top_k == "mixed" else [(top_k, top_p, 0.0)] * len(scales)
    md = SamplingMetadata.from_params([SamplingParams(top_k=k, top_p=p, min_p=m) for k, p, m in triples],
                                      device="cpu")
    p = s.softmax(dim=-1)
    floor = None if md.min_p is None else p.amax(dim=-1) * md.min_p
    pools = candidates.candidate_pools(p, floor, md.top_k, md.top_p)
    rows = [list(range(len(s))) if pool.rows is None else pool.rows.tolist() for pool in pools]
    assert sorted(sum(rows, [])) == list(range(len(scales)))
    for pool, pool_rows in zip(pools, rows):
        for position, r in enumerate(pool_rows):
            kept = p[r] >= pool.threshold[position]
            hf = hf_kept(s[r], 1.0, *triples[r])
            # transformers' top_p may cut through a group of tied tokens; lepton keeps the whole group.
            assert torch.equal(kept, hf if not rounded else s[r] >= s[r][hf].min()), \
                f"row {r} width {pool.values.shape[1]}"
            if pool.ids is not None:   # every kept token is among the row's candidates
                assert set(kept.nonzero()[:, 0].tolist()) <= set(pool.ids[position].tolist())
    widths = [pool.values.shape[1] if pool.ids is not None else "all" for pool in pools]
    if top_k == -1 and not cut:   # each stage settles some rows
        assert widths == [64, 1024, vocab]
    if top_k == -1 and cut:   # the cut settles the peaked rows (large scales), not the flat ones
        assert widths[0] < 1024 and pools[0].rows.tolist() == list(range(14 - len(pools[0].rows), 14))
    if top_k == "mixed" and cut:   # the flat row with min_p alone races over the whole vocabulary
        assert "all" in widths


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
def test_seeded_row_depends_on_seed_step_and_logits_alone(params, monkeypatch, race_impl):
    """The documented hash stream's race in float64, whatever the batch, the row's place in it,
    the candidates it races over, or how often it is asked."""
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
    monkeypatch.setattr(candidates, "CUT_WIDTH", 0)   # no cut: the top 64, 1024 or all tokens instead
    assert [draw(logits[None], [target], steps=[step]).token_ids[0] for step in range(6)] == expected


def test_unseeded_rows_follow_the_shared_generator(race_impl):
    logits = torch.randn(16, 500, generator=seeded(2))
    params = [SamplingParams(temperature=1.0, top_p=0.9)] * 16
    first = draw(logits, params, seeded(1)).token_ids
    assert draw(logits, params, seeded(1)).token_ids == first
    assert draw(logits, params, seeded(2)).token_ids != first


@pytest.mark.parametrize("bad", ["nan", "+inf", "-inf"])
def test_non_finite_rows_leave_the_others_alone(bad, race_impl):
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
    bad_rows = [SamplingParams(temperature=0.9, logprobs=3),
                SamplingParams(seed=7, temperature=0, presence_penalty=1.0)]
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


@pytest.mark.parametrize("params", [dict(temperature=0), dict(temperature=0.8, top_p=0.9),
                                    dict(temperature=1.0, top_p=5e-324, seed=4), dict(temperature=1.0, min_p=0.5)])
def test_penalties_that_overflow_keep_the_row_usable(params):
    """repetition_penalty near 0 divides the seen tokens' positive logits by ~0: +inf, the limit's
    whole mass. The row still samples one of them (no NaN, no crash), and its batch mate is untouched."""
    logits = torch.tensor([[2.0, 1.0, -1.0, 3.0, 0.5], [0.1, 0.2, 0.3, 0.4, 5.0]])
    rows = [SamplingParams(repetition_penalty=5e-324, **params), SamplingParams(temperature=0)]
    for _ in range(20):
        out = draw(logits, rows, prompt_token_ids=[[0, 1, 2], []], output_token_ids=[[], []])
        assert out.finite == [True, True]
        assert out.token_ids[0] in (0, 1) and out.token_ids[1] == 4   # seen and positive: 2.0, 1.0
