"""Top-k / top-p / min-p filtering and a draw, one token per row of a probability matrix.

For row r of probs p[R, V] (float32, rows summing to 1) with its parameters:
    keep {i : p_i >= t}, where t is the largest of
        top_k    the top_k-th largest p                      (top_k[r] = 0 or >= V: off)
        top_p    p of the token that ends the shortest prefix of the tokens sorted by p, descending,
                 whose mass reaches top_p; with top_k on, of the mass of the tokens top_k keeps
                 (top_p[r] = 1: off; masses summed in float64)
        min_p    min_p * max p                               (min_p[r] = 0: off)
    (tokens tied with t stay, as in Hugging Face transformers), and draw
        token = argmax_{kept i} p_i / E_i,    E_i = exponential_noise(keys[r], i) ~ Exp(1)
the exponential race: an exact draw from p restricted to the kept tokens and renormalized
(P[i wins] = p_i / sum of kept p). E_i is a hash of (keys[r], i) (lepton_kernels/sampling/noise.py),
so a row's token depends on its probabilities, parameters and key alone, never on other rows.

The eager implementation keeps the race to a few candidates per row where the filters allow
(lepton_kernels/sampling/candidates.py) with batched tensor ops; the ``ext`` implementation (cpu,
csrc/sampling_cpu.cpp) walks each row in C++ and computes the same thresholds on the same values.
"""

from __future__ import annotations

import torch
from torch.utils.dlpack import to_dlpack

from ..backends import native_module, native_why_not
from ..checks import check_same_device, check_tensor
from ..registry import SampleInput, register_impl, register_op
from ..sampling.candidates import at, candidate_pools
from ..sampling.noise import exponential_noise


def check_args(probs: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
               min_p: torch.Tensor | None, keys: torch.Tensor) -> None:
    """Shapes, dtypes and devices (no device sync: parameter values are the caller's to validate)."""
    check_tensor("probs", probs, 2, dtypes=(torch.float32,))
    if probs.shape[1] == 0:
        raise ValueError("probs must have at least one column (the vocabulary)")
    rows = probs.shape[0]
    for name, t, dtype in (("top_k", top_k, torch.int64), ("top_p", top_p, torch.float32),
                           ("min_p", min_p, torch.float32), ("keys", keys, torch.int64)):
        if t is None and name != "keys":
            continue
        check_tensor(name, t, 1, dtypes=(dtype,))
        if t.shape[0] != rows:
            raise ValueError(f"{name} must have one entry per row of probs ({rows}), got {t.shape[0]}")
    check_same_device(probs=probs, top_k=top_k, top_p=top_p, min_p=min_p, keys=keys)


@register_op
def sample_from_probs(probs: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
                      min_p: torch.Tensor | None, keys: torch.Tensor) -> torch.Tensor:
    """probs[R, V] f32, top_k[R] i64 | None, top_p[R] f32 | None, min_p[R] f32 | None,
    keys[R] i64 -> token ids [R] i64 (see the module doc)."""
    check_args(probs, top_k, top_p, min_p, keys)
    floor = None if min_p is None else probs.amax(dim=-1) * min_p   # min_p 0: a floor of 0, no filter
    tokens = None
    for pool in candidate_pools(probs, floor, top_k, top_p):
        ids = pool.ids if pool.ids is not None else torch.arange(probs.shape[1], device=probs.device)[None]
        weights = pool.weights / exponential_noise(at(keys, pool.rows), ids)
        if pool.threshold is not None:   # after the division: a dropped 0 / 0 would be a NaN, argmax's pick
            weights.masked_fill_(pool.values < pool.threshold[:, None], 0)
        picks = weights.argmax(dim=-1)
        picks = picks if pool.ids is None else pool.ids.gather(1, picks[:, None])[:, 0]
        if pool.rows is None:
            return picks
        tokens = tokens if tokens is not None else torch.empty(len(probs), dtype=torch.long, device=probs.device)
        tokens[pool.rows] = picks
    return tokens if tokens is not None else torch.empty(0, dtype=torch.long, device=probs.device)


def sample_from_probs_ext(probs: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
                          min_p: torch.Tensor | None, keys: torch.Tensor) -> torch.Tensor:
    """The ``ext`` implementation: lepton_kernels._C walks each row on the cpu."""
    check_args(probs, top_k, top_p, min_p, keys)
    out = torch.empty(probs.shape[0], dtype=torch.int64)
    if probs.shape[0]:
        native_module().sample_from_probs(
            to_dlpack(probs if probs.stride(1) == 1 else probs.contiguous()),
            *(None if t is None else to_dlpack(t.contiguous()) for t in (top_k, top_p, min_p, keys)),
            to_dlpack(out))
    return out


@sample_from_probs.set_sample_inputs
def sample_inputs(device="cpu", dtype=torch.float32) -> list[SampleInput]:
    g = torch.Generator().manual_seed(3)
    samples = []
    for rows, vocab in [(5, 7), (9, 300)]:
        probs = torch.softmax(3 * torch.randn(rows, vocab, generator=g), dim=-1).to(device)
        keys = torch.randint(-2**63, 2**63 - 1, (rows,), generator=g).to(device)
        top_k = torch.tensor([0, 1, 3, 0, 50, 2, 0, 9, 0][:rows], device=device)
        top_p = torch.tensor([1.0, 0.9, 0.5, 0.3, 1.0, 0.99, 0.8, 1.0, 0.6][:rows], device=device)
        min_p = torch.tensor([0.0, 0.0, 0.1, 0.0, 0.05, 0.0, 0.2, 0.0, 0.0][:rows], device=device)
        samples.append(SampleInput(f"R{rows}_V{vocab}_plain", (probs, None, None, None, keys)))
        samples.append(SampleInput(f"R{rows}_V{vocab}_filtered", (probs, top_k, top_p, min_p, keys)))
    return samples


# The only accelerated implementation (cpu).
register_impl(sample_from_probs, "ext", sample_from_probs_ext, device_types=["cpu"], dtypes=[torch.float32],
              available=native_why_not)
