"""The batched sampler against float64 math written here and transformers' logits processors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from lepton.engine.sampler import SamplingRow, _top_k_top_p, compute_logprobs, sample
from lepton.sampling_params import RequestOutputKind, SamplingParams

TINY = [1.2, 1.0, 0.7, 0.3, 0.0, -0.4, -0.9, -1.5]   # the fixed distribution, in logits


def row(gen: torch.Generator | None = None, prompt=(), output=(), **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), gen, list(prompt), list(output))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


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


@pytest.mark.parametrize("mode", ["sorted", "candidates", "seeded"])
@pytest.mark.parametrize("temperature,top_k,top_p,min_p", FILTERS)
def test_sampled_frequencies(mode, temperature, top_k, top_p, min_p):
    """Sorted: V = 8, so a full sort; candidates: the 8 tokens at scattered ids among 3000, the
    rest -inf (top-64 candidates); seeded: the same with -1e4, each row with its own generator."""
    expected = reference_probs(TINY, temperature, top_k, top_p, min_p)
    assert torch.equal(hf_kept(torch.tensor(TINY), temperature, top_k, top_p, min_p),
                       torch.from_numpy(expected > 0))
    vocab, count = {"sorted": len(TINY)}.get(mode, 3000), 4000
    ids = torch.randperm(vocab, generator=seeded(vocab))[:len(TINY)]
    logits = torch.full((vocab,), -1e4 if mode == "seeded" else float("-inf"))
    logits[ids] = torch.tensor(TINY)
    params = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    rows = [row(seeded(1000 + i) if mode == "seeded" else None, **params) for i in range(count)]
    out = sample(logits.expand(count, vocab), rows, generator=seeded(7))
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
    params = [SamplingParams(top_k=k, top_p=p) for k, p in pairs]
    pools = _top_k_top_p(s, s.amax(dim=-1), list(range(len(scales))), params)
    assert sorted(i for pool in pools for i in pool.rows.tolist()) == list(range(len(scales)))
    for pool in pools:
        for position, r in enumerate(pool.rows.tolist()):
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
        assert sample(logits, [row(**params)] * 32, generator=seeded(0)).token_ids == expected, params


def reference_processed(logits: torch.Tensor, r: SamplingRow, eos: list[int]) -> torch.Tensor:
    """float64 min_tokens, logit_bias, transformers' repetition penalty, OpenAI's penalties."""
    z = logits.double().clone()
    p = r.params
    if len(r.output_token_ids) < p.min_tokens:
        z[p.stop_token_ids + ([] if p.ignore_eos else eos)] = float("-inf")
    for token, value in (p.logit_bias or {}).items():
        z[token] += value
    seen = list(r.prompt_token_ids) + list(r.output_token_ids)
    if seen:
        z = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([seen]), z[None])[0]
    counts = torch.bincount(torch.tensor(list(r.output_token_ids), dtype=torch.long), minlength=len(z))
    return z - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)


def test_processors_change_greedy_choices_as_the_reference():
    vocab, eos = 40, [0, 1]
    gen = np.random.default_rng(0)
    logits = torch.randn(300, vocab, generator=seeded(5)) * 0.7
    rows = []
    for i in range(300):
        # Tokens near the top of the row, so the penalties move the argmax.
        top = logits[i].topk(6).indices.numpy()
        bias = {int(t): float(gen.normal()) for t in gen.choice(vocab, 2)} if i % 3 == 0 else None
        rows.append(row(prompt=gen.choice(top, 3), output=gen.choice(top, gen.integers(0, 8)), temperature=0,
                        repetition_penalty=float(gen.choice([1.0, 0.7, 1.3, 2.0])),
                        presence_penalty=float(gen.choice([0.0, 0.5, -0.3])),
                        frequency_penalty=float(gen.choice([0.0, 0.4, 1.5])),
                        logit_bias=bias,
                        min_tokens=int(gen.integers(0, 5)), stop_token_ids=[int(top[0])] if i % 4 == 0 else None,
                        ignore_eos=i % 5 == 0, max_tokens=None))
    before = logits.clone()
    got = sample(logits, rows, eos_token_ids=eos).token_ids
    assert torch.equal(logits, before), "the caller's logits must stay untouched"
    expected = [int(reference_processed(logits[i], rows[i], eos).argmax()) for i in range(300)]
    assert got == expected
    assert sum(g != int(z.argmax()) for g, z in zip(got, logits)) > 100   # the processors did matter


def test_crafted_processor_cases():
    z = torch.tensor([[5.0, 4.9, 4.0, 0.0, -1.0]])

    def greedy(**kw) -> int:
        return sample(z, [row(temperature=0, max_tokens=None, **kw)], eos_token_ids={0}).token_ids[0]

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
    neg = torch.tensor([[-1.0, -1.05, -3.0]])
    # A negative logit is multiplied: -1 * 1.1 < -1.05.
    assert sample(neg, [row(temperature=0, output=[0], repetition_penalty=1.1)]).token_ids == [1]
    with pytest.raises(ValueError, match="logit_bias"):
        sample(z, [row(logit_bias={5: 1.0})])


def mixed_batch(target: SamplingRow, logits: torch.Tensor, where: int) -> tuple[torch.Tensor, list[SamplingRow]]:
    """target at row `where` among seeded, unseeded and greedy mates with other filters."""
    mates = [row(seeded(99), temperature=1.3, top_k=700), row(temperature=0.5, top_p=0.7),
             row(temperature=0, logprobs=3), row(seeded(5), min_p=0.2),
             row(temperature=1.0, repetition_penalty=1.5, output=[1, 2, 3])]
    rows = mates[:where] + [target] + mates[where:]
    others = torch.randn(len(mates), logits.shape[-1], generator=seeded(where))
    return torch.cat([others[:where], logits[None], others[where:]]), rows


@pytest.mark.parametrize("params", [dict(temperature=0.9, top_p=0.95), dict(temperature=1.1, top_k=20),
                                    dict(temperature=1.0), dict(temperature=0.7, min_p=0.1, top_p=0.99)])
def test_seeded_row_ignores_its_batch_mates(params):
    logits = torch.randn(1000, generator=seeded(42)) * 2
    gen = seeded(123)
    alone = [sample(logits[None], [row(gen, **params)]).token_ids[0] for _ in range(6)]
    for where in (0, 2, 5):
        gen = seeded(123)
        batched = []
        for step in range(6):
            batch, rows = mixed_batch(row(gen, **params), logits, where)
            batched.append(sample(batch, rows, generator=seeded(step)).token_ids[where])
        assert batched == alone, where
    assert len(set(alone)) > 1


def test_unseeded_rows_follow_the_shared_generator():
    logits = torch.randn(16, 500, generator=seeded(2))
    rows = [row(temperature=1.0, top_p=0.9)] * 16
    first = sample(logits, rows, generator=seeded(1)).token_ids
    assert sample(logits, rows, generator=seeded(1)).token_ids == first
    assert sample(logits, rows, generator=seeded(2)).token_ids != first


@pytest.mark.parametrize("bad", ["nan", "+inf", "-inf"])
def test_non_finite_rows_leave_the_others_alone(bad):
    vocab = 300
    logits = torch.randn(4, vocab, generator=seeded(8))

    def rows() -> list[SamplingRow]:   # fresh generators for each call
        return [row(seeded(1), temperature=0.8, top_p=0.9, logprobs=2), row(temperature=0, logprobs=0),
                row(seeded(2), temperature=1.2), row(seeded(3), top_k=5, min_p=0.1)]

    clean = sample(logits, rows())
    poison = torch.randn(2, vocab, generator=seeded(9))
    if bad == "nan":
        poison[:, 17] = float("nan")
    elif bad == "+inf":
        poison[:, 3] = float("inf")
    else:
        poison[:] = float("-inf")
    mixed = torch.cat([poison[:1], logits[:2], poison[1:], logits[2:]])
    bad_rows = [row(temperature=0.9, logprobs=3), row(seeded(7), temperature=0, presence_penalty=1.0, output=[1])]
    good_rows = rows()
    mixed_rows = bad_rows[:1] + good_rows[:2] + bad_rows[1:] + good_rows[2:]
    before = mixed.clone()
    out = sample(mixed, mixed_rows, generator=seeded(0))
    assert torch.equal(mixed.isnan(), before.isnan()) and torch.equal(mixed.nan_to_num(), before.nan_to_num())
    assert out.finite == [False, True, True, False, True, True]
    assert out.token_ids[0] == out.token_ids[3] == 0 and np.isfinite(out.logprobs[0])   # zeros, not NaN
    good = [1, 2, 4, 5]
    for name in ("token_ids", "logprobs", "ranks", "top_ids", "top_logprobs"):
        assert [getattr(out, name)[i] for i in good] == getattr(clean, name), name


def reference_logprob_stats(logits: torch.Tensor, token: int, num_top: int):
    lp = logits.double().log_softmax(-1)
    order = lp.argsort(descending=True)[:num_top]
    return float(lp[token]), int((lp > lp[token]).sum()) + 1, order.tolist(), lp[order].tolist()


def test_logprobs_are_of_the_raw_distribution():
    logits = torch.randn(6, 50, generator=seeded(4)) * 3
    asked = [None, 0, 3, 7, 2, 5]
    rows = [row(seeded(i), temperature=[0, 0.8][i % 2], logprobs=n, top_k=[-1, 4][i % 2],
                output=[0, 1, 2], frequency_penalty=0.5, logit_bias={3: 2.0}) for i, n in enumerate(asked)]
    out = sample(logits, rows)
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
