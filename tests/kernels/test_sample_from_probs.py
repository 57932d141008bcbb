"""sample_from_probs, every implementation, against the definition in float64 written here: the
kept set by sorting, the race with the documented noise; the native noise against the torch one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import lepton_kernels as lk
from lepton_kernels.ext import ext_info, native_module
from lepton_kernels.ops.sample_from_probs import sample_from_probs_ext
from lepton_kernels.sampling.noise import exponential_noise

IMPLS = ["eager", "ext"]


def usable(impl: str) -> None:
    why = lk.get_op("sample_from_probs").get_impl(impl)
    if why is not None and (reason := why.why_not("cpu", torch.float32, explicit=True)):
        pytest.skip(f"{impl}: {reason}")


def reference_token(p: np.ndarray, top_k: int, top_p: float, min_p: float, key: int) -> int:
    """The module doc's definition on one row, thresholds on the float32 values, masses in float64."""
    vocab = len(p)
    order = sorted(range(vocab), key=lambda i: -p[i])
    t = -math.inf
    kept_by_k = order
    if 0 < top_k < vocab:
        kth = p[order[top_k - 1]]
        t = kth
        kept_by_k = [i for i in order if p[i] >= kth]
    if top_p < 1:
        target = float(top_p) if not 0 < top_k < vocab else sum(float(p[i]) for i in kept_by_k) * float(top_p)
        mass, last = 0.0, kept_by_k[-1]
        for i in kept_by_k:
            mass += float(p[i])
            if mass >= target:
                last = i
                break
        t = max(t, p[last])
    if min_p > 0:
        t = max(t, np.float32(p.max()) * np.float32(min_p))
    noise = exponential_noise(torch.tensor([key]), torch.arange(vocab)[None])[0].numpy()
    weights = np.where(p >= t, p / noise, -1.0)   # float32 division, as the implementations
    return int(np.argmax(weights))


def batch(rows: int, vocab: int, seed: int, peaked: float = 4.0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(rows, vocab, generator=g) * peaked, dim=-1)
    top_k = torch.randint(0, vocab + 3, (rows,), generator=g) * (torch.rand(rows, generator=g) < 0.5)
    top_p = torch.where(torch.rand(rows, generator=g) < 0.6, torch.rand(rows, generator=g), torch.ones(rows))
    min_p = torch.where(torch.rand(rows, generator=g) < 0.3, torch.rand(rows, generator=g) * 0.5, torch.zeros(rows))
    keys = torch.randint(-2**63, 2**63 - 1, (rows,), generator=g)
    return probs, top_k, top_p, min_p, keys


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("vocab,peaked", [(1, 1.0), (2, 1.0), (7, 0.5), (300, 4.0), (2000, 8.0), (2000, 0.2)])
@pytest.mark.parametrize("filters", ["all", "top_p", "top_k", "min_p", "none"])
def test_matches_the_definition(impl, vocab, peaked, filters):
    usable(impl)
    probs, top_k, top_p, min_p, keys = batch(24, vocab, vocab + int(10 * peaked), peaked)
    chosen = {"all": (top_k, top_p, min_p), "top_p": (None, top_p, None), "top_k": (top_k, None, None),
              "min_p": (None, None, min_p), "none": (None, None, None)}[filters]
    with lk.use(sample_from_probs=impl):
        tokens = lk.sample_from_probs(probs, *chosen, keys)
    assert tokens.dtype == torch.int64 and tokens.shape == (24,)
    p = probs.numpy()
    for r in range(24):
        k = 0 if chosen[0] is None else int(top_k[r])
        tp = 1.0 if chosen[1] is None else float(top_p[r])
        mp = 0.0 if chosen[2] is None else float(min_p[r])
        assert int(tokens[r]) == reference_token(p[r], k, np.float32(tp), mp, int(keys[r])), (r, k, tp, mp)


@pytest.mark.parametrize("impl", IMPLS)
def test_ties_at_a_threshold_stay(impl):
    """Four tokens tied at the top_k-th value: all four stay, and each wins about a quarter."""
    usable(impl)
    row = torch.tensor([0.3, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.2])
    rows = 4000
    keys = torch.arange(rows, dtype=torch.int64) * 7919 + 17
    with lk.use(sample_from_probs=impl):
        tokens = lk.sample_from_probs(row.expand(rows, -1).contiguous(), torch.full((rows,), 3), None, None, keys)
    counts = np.bincount(tokens.numpy(), minlength=8)
    assert counts[[5, 6]].sum() == 0 and counts[[1, 2, 3, 4]].min() > 0
    kept = np.array([0.3, 0.1, 0.1, 0.1, 0.1, 0.2])
    expected = rows * kept / kept.sum()
    observed = counts[[0, 1, 2, 3, 4, 7]]
    assert np.abs(observed - expected).max() < 5 * np.sqrt(expected.max())


@pytest.mark.parametrize("impl", IMPLS)
def test_a_row_depends_on_its_own_inputs_alone(impl):
    usable(impl)
    probs, top_k, top_p, min_p, keys = batch(40, 500, 11)
    with lk.use(sample_from_probs=impl):
        whole = lk.sample_from_probs(probs, top_k, top_p, min_p, keys)
        perm = torch.randperm(40, generator=torch.Generator().manual_seed(2))
        shuffled = lk.sample_from_probs(probs[perm], top_k[perm], top_p[perm], min_p[perm], keys[perm])
        alone = [int(lk.sample_from_probs(probs[r:r + 1], top_k[r:r + 1], top_p[r:r + 1], min_p[r:r + 1],
                                          keys[r:r + 1])) for r in range(0, 40, 7)]
    assert torch.equal(shuffled, whole[perm])
    assert alone == whole[::7].tolist()
    assert len(lk.sample_from_probs(probs[:0], None, None, None, keys[:0])) == 0


def test_native_noise_is_the_documented_noise():
    if not ext_info()["built"]:
        pytest.skip("the native extension is not built")
    keys = [0, -1, 2**63 - 1, -2**63, 123456789]
    torch_noise = exponential_noise(torch.tensor(keys), torch.arange(64)[None]).numpy()
    native = np.array([[native_module().exponential_noise(k, t) for t in range(64)] for k in keys], dtype=np.float32)
    assert np.array_equal(torch_noise, native)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_arguments_name_themselves(impl):
    usable(impl)
    probs, top_k, top_p, min_p, keys = batch(3, 10, 1)
    bad = [((probs.double(), None, None, None, keys), "probs"), ((probs[0], None, None, None, keys), "probs"),
           ((probs, top_k.int(), None, None, keys), "top_k"), ((probs, None, top_p[:2], None, keys), "top_p"),
           ((probs, None, None, min_p.double(), keys), "min_p"), ((probs, None, None, None, keys.float()), "keys"),
           ((probs[:, :0], None, None, None, keys), "probs")]
    fn = lk.get_op("sample_from_probs").eager if impl == "eager" else sample_from_probs_ext
    for args, name in bad:   # called directly: the registry refuses a float64 probs before ext sees it
        with pytest.raises(ValueError, match=name):
            fn(*args)
