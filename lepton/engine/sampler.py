"""The batched sampler: one vectorized pass over the next-token logits of the whole batch.

For each row of logits z[V] (float32) and its row of the step's SamplingMetadata:
    finite    NaN or +inf anywhere, or every entry -inf: the row is replaced by zeros (so it cannot
              disturb the others), flagged, and its token is 0
    logprobs  log_softmax(z), the raw model distribution: the sampled token's value and rank, and
              the top-N, for the rows that ask
    z <- min_tokens bans, logit_bias, repetition / frequency / presence penalties (penalties.py)
    greedy    (temperature < SAMPLING_EPS): argmax z
    otherwise s = z / temperature, p = softmax(s), keep {i : s_i >= t} where t is the largest of
                  top_k    the top_k-th largest s
                  top_p    s of the last token of the smallest prefix of the sorted tokens (after
                           top_k) whose mass reaches top_p, at least one token
                  min_p    max s + log(min_p), that is p_i >= min_p * max p
              (tokens tied with t stay, as in HF transformers), and draw
                  token = argmax_{kept i} p_i / E_i,    E_i ~ Exp(1)
              the exponential race, an exact draw from p restricted to the kept tokens.
A seeded row's E_i is a hash of (seed, step, i) (sampling_metadata.py), so its token depends on
its seed, its step and its logits alone, never on its batch mates or its place in the batch; the
other rows share one batched draw from the shared generator.

Cost: a row races over a few candidates, not the vocabulary, where its filters allow: the
candidate search (candidates.py) looks for its kept tokens among a cut by value, then the top 64
and the top 1024 tokens, and sorts the vocabulary only last.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lepton.engine.candidates import at, candidate_pools
from lepton.engine.penalties import apply_logits_processors
from lepton.engine.sampling_metadata import SamplingMetadata, race_noise, stream_keys
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
        best = best.masked_fill(~finite, 0)
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
            best = _repair(z, best, finite)
            all_finite = bool(finite.all())
        token_ids = None if md.all_random else z.argmax(dim=-1)
    if md.all_random:
        token_ids = _draw(z, best, md, None, generator)
    elif not md.all_greedy:
        rows = (md.temperature >= SAMPLING_EPS).nonzero()[:, 0]
        token_ids[rows] = _draw(z[rows], best[rows], md, rows, generator)
    if not all_finite:
        token_ids.masked_fill_(~finite, 0)
    out = SamplerOutput(token_ids.tolist(), [None] * count, [None] * count, [None] * count, [None] * count,
                        finite.tolist(), token_ids)
    if asked is not None:
        _fill_logprobs(out, raw, token_ids[asked], asked.tolist(), wanted[asked].tolist())
    return out


def _repair(z: torch.Tensor, best: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """Rows the processors pushed out of range, in place: a repetition penalty near 0 divides by
    ~0 (+inf), 0 * inf is NaN. The +inf tokens are the limit's whole mass, so they tie at 0 and
    the rest drop to -inf; a row with a NaN, or with nothing finite left, is unusable like a NaN
    row of the model (flagged in ``finite``, zeroed). Returns the new row maxima."""
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
    return z.amax(dim=-1)


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


def _draw(z: torch.Tensor, best: torch.Tensor, md: SamplingMetadata, rows: torch.Tensor | None,
          generator: torch.Generator | None) -> torch.Tensor:
    """Temperature, top_k, top_p and min_p, then the exponential race, for z[R,V], the logits of
    metadata rows `rows` (None: all); best[R] = max z."""
    temperature = at(md.temperature, rows)
    s = z / temperature[:, None]
    # best / T = max s, as dividing by T > 0 keeps the order; log 0 = -inf: min_p off
    floor = None if md.min_p is None else best / temperature + at(md.min_p, rows).log()
    keys = seeded = None
    if md.seeds is not None:
        keys, seeded = stream_keys(at(md.seeds, rows), at(md.steps, rows)), at(md.seeded, rows)
    token_ids = None
    for pool in candidate_pools(s, torch.softmax(s, dim=-1), floor, at(md.top_k, rows), at(md.top_p, rows)):
        ids = pool.ids if pool.ids is not None else torch.arange(s.shape[1], device=s.device)[None]
        noise = race_noise(pool.weights.shape, ids, at(keys, pool.rows), at(seeded, pool.rows), generator)
        weights = pool.weights / noise
        if pool.threshold is not None:   # after the division: a dropped 0 / 0 would be a NaN, argmax's pick
            weights.masked_fill_(pool.values < pool.threshold[:, None], 0)
        picks = weights.argmax(dim=-1)
        picks = picks if pool.ids is None else pool.ids.gather(1, picks[:, None])[:, 0]
        if pool.rows is None:
            return picks
        token_ids = token_ids if token_ids is not None else torch.empty(len(s), dtype=torch.long, device=s.device)
        token_ids[pool.rows] = picks
    return token_ids
