"""SamplingMetadata and SamplingParams: the metadata built from params against metadata built
by hand, the documented seed stream against a pure-Python splitmix64, and parameter checks."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest
import torch

from lepton_kernels.sampling.noise import exponential_noise, stream_keys

from lepton.engine.sampler import sample_batch
from lepton.engine.sampling_metadata import SamplingMetadata, seed_key
from lepton.sampling_params import RequestOutputKind, SamplingParams
from tests.engine.test_sampler import reference_key, reference_noise, seeded


def test_from_params_matches_hand_built_metadata():
    params = [SamplingParams(temperature=0), SamplingParams(top_k=5, seed=2**64 - 1, logprobs=2),
              SamplingParams(top_p=0.5, min_tokens=3, stop_token_ids=[7, 8], ignore_eos=True, logit_bias={4: 1.5}),
              SamplingParams(min_p=0.2, frequency_penalty=0.5, seed=9)]
    md = SamplingMetadata.from_params(params, device="cpu", prompt_token_ids=[[1], [2, 3], [], [4]],
                                      output_token_ids=[[5], [], [6], [7, 7]])
    t = torch.tensor
    hand = SamplingMetadata(
        temperature=t([0.0, 1, 1, 1]), all_greedy=False, all_random=False, top_k=t([0, 5, 0, 0]),
        top_p=t([1.0, 1, 0.5, 1]), min_p=t([0.0, 0, 0, 0.2]), keys=t([0, seed_key(reference_key(2**64 - 1, 0)), 0, seed_key(reference_key(9, 2))]),
        seeded=t([False, True, False, True]),
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
    assert all(getattr(plain, f.name) is None for f in fields(SamplingMetadata)[4:])


def test_seed_key_and_the_documented_stream():
    assert [seed_key(s) for s in (0, 2**63 - 1, 2**63, 2**64 - 1, -5)] == [0, 2**63 - 1, -2**63, -1, -5]
    for bad in (2**64, -2**63 - 1, 1.0, True):
        with pytest.raises(ValueError, match="seed"):
            seed_key(bad)
    keys = stream_keys(np.array([seed_key(2**64 - 3), 11]), np.array([5, 0]))
    assert keys.tolist() == [seed_key(reference_key(2**64 - 3, 5)), seed_key(reference_key(11, 0))]
    noise = exponential_noise(torch.from_numpy(keys), torch.arange(300)[None]).double().numpy()
    assert np.allclose(noise, [reference_noise(2**64 - 3, 5, 300), reference_noise(11, 0, 300)], rtol=1e-6, atol=0)


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
