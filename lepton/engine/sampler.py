"""The batched sampler: one vectorized pass over the next-token logits of the whole batch.

For each row of logits z[V] (float32) and its row of the step's SamplingMetadata:
    finite    NaN or +inf anywhere, or every entry -inf: the row is replaced by zeros (so it cannot
              disturb the others), flagged, and its token is 0
    logprobs  log_softmax(z), the raw model distribution: the sampled token's value and rank, and
              the top-N, for the rows that ask
    z <- min_tokens bans, logit_bias, repetition / frequency / presence penalties (penalties.py)
    greedy    (temperature < SAMPLING_EPS): argmax z
    otherwise p = softmax(z / temperature), and lepton_kernels.sample_from_probs keeps the tokens
              top_k / top_p / min_p allow (ties with a threshold stay, as in HF transformers) and
              draws token = argmax_{kept i} p_i / E_i with E_i ~ Exp(1): the exponential race, an
              exact draw from p restricted to the kept tokens. E_i is a hash of (key, i):
                  seeded rows    key = stream_keys(seed, step): the token depends on the seed, the
                                 step and the logits alone, never on batch mates or the row's place
                  other rows     key drawn from the shared generator, one per row and step
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import lepton_kernels as lk
from lepton_kernels.sampling.candidates import at

from lepton.engine.penalties import apply_logits_processors
from lepton.engine.sampling_metadata import SamplingMetadata
from lepton.sampling_params import SAMPLING_EPS


@dataclass
class SamplerOutput:
    """Per row. logprobs, ranks and top-N are of the raw model distribution, None for rows that
    did not ask; finite False: the row's logits were unusable and its token (0) is meaningless."""

    token_ids: list[int]
    logprobs: list[float | None]
    ranks: list[int | None]
    top_ids: list[list[int] | None]
    top_logprobs: list[list[float] | None]
    finite: list[bool]
    sampled_token_ids: torch.Tensor | None = None   # token_ids as [B] int64 on the logits' device


def sample_batch(logits: torch.Tensor, metadata: SamplingMetadata, generator: torch.Generator | None = None,
                 eos_token_ids: torch.Tensor | None = None) -> SamplerOutput:
    """Sample one token per row of logits[B,V] (see the module doc); eos_token_ids [E] i64 are
    banned with the stop tokens of rows still short of min_tokens."""
    md, count = metadata, metadata.num_rows
    if logits.dim() != 2 or logits.shape[0] != count:
        raise ValueError(f"logits must be [B, V] with B = {count} metadata rows, got {list(logits.shape)}")
    z = logits.float()
    # max propagates NaN: one pass finds every bad row (and, with indices, the greedy tokens)
    best, token_ids = (z.amax(dim=-1), None) if md.all_random else z.max(dim=-1)
    finite = best.isfinite()
    all_finite = bool(finite.all())
    if not all_finite:
        z = z.clone() if z is logits else z
        z.masked_fill_(~finite[:, None], 0)
    asked = raw = None
    if md.num_logprobs is not None:
        wanted = torch.tensor(md.num_logprobs, device=z.device)
        asked = (wanted >= 0).nonzero()[:, 0]
        raw = torch.log_softmax(z if len(asked) == count else z[asked], dim=-1)
    if md.needs_processors:
        z = z.clone() if z is logits else z
        apply_logits_processors(z, md, eos_token_ids)
        best = z.amax(dim=-1)
        if not bool(best.isfinite().all()):
            _repair(z, best, finite)
            all_finite = bool(finite.all())
        token_ids = None if md.all_random else z.argmax(dim=-1)
    if md.all_random:
        token_ids = _draw(z, md, None, generator)
    elif not md.all_greedy:
        rows = (md.temperature >= SAMPLING_EPS).nonzero()[:, 0]
        token_ids[rows] = _draw(z[rows], md, rows, generator)
    if not all_finite:
        token_ids.masked_fill_(~finite, 0)
    out = SamplerOutput(token_ids.tolist(), [None] * count, [None] * count, [None] * count, [None] * count,
                        finite.tolist(), token_ids)
    if asked is not None:
        _fill_logprobs(out, raw, token_ids[asked], asked.tolist(), wanted[asked].tolist())
    return out


def _repair(z: torch.Tensor, best: torch.Tensor, finite: torch.Tensor) -> None:
    """Rows the processors pushed out of range, in place: a repetition penalty near 0 divides by
    ~0 (+inf), 0 * inf is NaN. The +inf tokens are the limit's whole mass, so they tie at 0 and
    the rest drop to -inf; a row with a NaN, or with nothing finite left, is unusable like a NaN
    row of the model (flagged in ``finite``, zeroed)."""
    bad = ~best.isfinite()
    rows = bad.nonzero()[:, 0]
    sub = z[rows]
    top = sub == float("inf")
    fixed = torch.where(top, 0.0, float("-inf"))
    has_top = top.any(dim=-1)
    unusable = sub.isnan().any(dim=-1) | ~has_top
    sub = torch.where(has_top[:, None], fixed, sub)
    sub[unusable] = 0
    z[rows] = sub
    finite[rows[unusable]] = False


def _fill_logprobs(out: SamplerOutput, raw: torch.Tensor, chosen: torch.Tensor, rows: list[int],
                   wanted: list[int]) -> None:
    """Per-row output lists for the rows that asked (raw: their log_softmax)."""
    stats = _logprob_stats(raw, chosen, max(wanted))
    for b, n, value, rank, ids, lps in zip(rows, wanted, *stats):
        out.logprobs[b], out.ranks[b], out.top_ids[b], out.top_logprobs[b] = value, rank, ids[:n], lps[:n]


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: int
                     ) -> tuple[list[float], list[int], list[list[int]], list[list[float]]]:
    """For prompt logprobs: per row t of logits[T,V], logprob and rank (1 = most likely) of
    token_ids[t] under log_softmax(logits[t]), and the top num_top ids and logprobs."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return _logprob_stats(logprobs, token_ids.to(logits.device), num_top)


def _logprob_stats(logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int
                   ) -> tuple[list[float], list[int], list[list[int]], list[list[float]]]:
    chosen = logprobs.gather(1, token_ids[:, None])
    ranks = (logprobs > chosen).sum(dim=-1, dtype=torch.int32) + 1   # int64 sums of bools are slow
    if num_top > 0:
        top_lps, top_ids = logprobs.topk(min(num_top, logprobs.shape[-1]), dim=-1)
        top_lps, top_ids = top_lps.tolist(), top_ids.tolist()
    else:
        top_lps = top_ids = [[] for _ in range(logprobs.shape[0])]
    return chosen[:, 0].tolist(), ranks.tolist(), top_ids, top_lps


def _draw(z: torch.Tensor, md: SamplingMetadata, rows: torch.Tensor | None,
          generator: torch.Generator | None) -> torch.Tensor:
    """Temperature, then top_k / top_p / min_p and the race (lepton_kernels.sample_from_probs)
    for z[R,V], the logits of metadata rows `rows` (None: all)."""
    probs = torch.softmax(z / at(md.temperature, rows)[:, None], dim=-1)
    return lk.sample_from_probs(probs, at(md.top_k, rows), at(md.top_p, rows), at(md.min_p, rows),
                                race_keys(md, rows, len(z), generator))


def race_keys(md: SamplingMetadata, rows: torch.Tensor | None, count: int,
              generator: torch.Generator | None) -> torch.Tensor:
    """The race's noise key of each drawn row: a seeded row's (seed, step) stream, for the others
    one draw from the shared generator (all 64 bits)."""
    seeded = at(md.seeded, rows)
    if seeded is not None:
        keys = at(md.keys, rows)
        if md.all_seeded:   # a host-side flag: no device sync
            return keys
    device = md.temperature.device
    drawn = torch.randint(-2**63, 2**63 - 1, (count,), dtype=torch.int64, device=device, generator=generator)
    return drawn if seeded is None else torch.where(seeded, keys, drawn)
