"""The batched sampler: one vectorized pass over the next-token logits of the whole batch.

For each row of logits z[V] (float32) and its row of the step's SamplingMetadata:
    finite    NaN or +inf anywhere, or every entry -inf: the row is replaced by zeros (so it cannot
              disturb the others), flagged, and its token is 0
    logprobs  log_softmax(z), the raw model distribution: the sampled token's value and rank, and
              the top-N, for the rows that ask
    z <- min_tokens bans, logit_bias, repetition / frequency / presence penalties (penalties.py)
    greedy    (temperature < SAMPLING_EPS): argmax z
    otherwise s = z / temperature, keep {i : s_i >= t} where t is the largest of
                  top_k    the top_k-th largest s
                  top_p    s of the last token of the smallest prefix of the sorted tokens (after
                           top_k) whose softmax mass reaches top_p, at least one token
                  min_p    max s + log(min_p), that is p_i >= min_p * max p
              (tokens tied with t stay, as in HF transformers), and draw
                  token = argmax_{kept i} exp(s_i - max s) / E_i,    E_i ~ Exp(1)
              the exponential race, an exact draw from softmax(s) restricted to the kept tokens.
A seeded row's E_i is a hash of (seed, step, i) (sampling_metadata.py), so its token depends on
its seed, its step and its logits alone, never on its batch mates or its place in the batch; the
other rows share one batched draw from the shared generator.

Cost: top_k / top_p thresholds are looked for among the top 64, then the top 1024 tokens
(torch.topk), and only rows whose kept set is wider get a full sort; rows whose kept set lies
within their candidates race over the candidates alone. The stages are fixed by V, so the stage a
row settles in depends on its own logits and parameters only.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from lepton.engine.penalties import apply_logits_processors
from lepton.engine.sampling_metadata import SamplingMetadata, seeded_exponentials, stream_keys
from lepton.sampling_params import SAMPLING_EPS, SamplingParams

CANDIDATES = (64, 1024)   # top-k sizes tried before a full sort
NEG_INF = float("-inf")


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
    best, token_ids = z.max(dim=-1)   # max propagates NaN: one pass finds every bad row
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
        if not md.all_random:
            token_ids = z.argmax(dim=-1)
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


def _at(x: torch.Tensor | None, index: torch.Tensor | None) -> torch.Tensor | None:
    """x[index], where index None stands for every row, in order (and x None for "not in use")."""
    return x if x is None or index is None else x[index]


def _rows(outer: torch.Tensor | None, inner: torch.Tensor | None) -> torch.Tensor | None:
    """Rows `inner` of a subset that is rows `outer` of the whole (None: all, in order)."""
    return outer if inner is None else inner if outer is None else outer[inner]


@dataclass
class _Pool:
    """Rows racing over the same candidate layout."""

    rows: torch.Tensor | None          # [n] positions among the drawn rows; None: all of them, in order
    values: torch.Tensor               # [n, K] candidate s, sorted descending, or whole rows of s
    ids: torch.Tensor | None           # [n, K] their token ids; None: values is in vocabulary order
    threshold: torch.Tensor | None     # [n] top_k / top_p threshold; None: neither is on


def _draw(z: torch.Tensor, md: SamplingMetadata, rows: torch.Tensor | None,
          generator: torch.Generator | None) -> torch.Tensor:
    """Temperature, top_k, top_p and min_p, then the exponential race, for z[R,V], the logits of
    metadata rows `rows` (None: all)."""
    s = z / _at(md.temperature, rows)[:, None]
    peak = s.amax(dim=-1)
    floor = None if md.min_p is None else peak + _at(md.min_p, rows).log()   # log 0 = -inf: off
    keys = seeded = None
    if md.seeds is not None:
        keys, seeded = stream_keys(_at(md.seeds, rows), _at(md.steps, rows)), _at(md.seeded, rows)
    token_ids = None
    for pool in _pools(s, peak, _at(md.top_k, rows), _at(md.top_p, rows)):
        threshold = pool.threshold
        if floor is not None:
            at = _at(floor, pool.rows)
            threshold = at if threshold is None else torch.maximum(threshold, at)
        noise = _noise(pool, _at(keys, pool.rows), _at(seeded, pool.rows), generator)
        picks = _race(pool.values, pool.ids, _at(peak, pool.rows), threshold, noise)
        if pool.rows is None:
            return picks
        token_ids = token_ids if token_ids is not None else torch.empty(len(s), dtype=torch.long, device=s.device)
        token_ids[pool.rows] = picks
    return token_ids


def _noise(pool: _Pool, keys: torch.Tensor | None, seeded: torch.Tensor | None,
           generator: torch.Generator | None) -> torch.Tensor:
    """E[n,K] ~ Exp(1) for the pool's candidates: seeded rows' from their streams, read at the
    candidates' token ids, the others' from the shared generator."""
    n, width = pool.values.shape
    device = pool.values.device
    ids = pool.ids if pool.ids is not None else torch.arange(width, device=device)[None]
    if seeded is None:
        return _exponential_(torch.empty(n, width, dtype=pool.values.dtype, device=device), generator)
    num_seeded = int(seeded.sum())
    if num_seeded == n:
        return seeded_exponentials(keys, ids)
    noise = _exponential_(torch.empty(n, width, dtype=pool.values.dtype, device=device), generator)
    if num_seeded:
        noise[seeded] = seeded_exponentials(keys[seeded], ids if pool.ids is None else ids[seeded])
    return noise


def _exponential_(out: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Fill ``out`` with Exp(1) draws as -log(U), U ~ Uniform[0, 1): on CPU about 4x faster than
    Tensor.exponential_ (U = 0 gives +inf, a weight of 0: that token simply loses the race)."""
    return out.uniform_(generator=generator).log_().neg_()


def _race(values: torch.Tensor, ids: torch.Tensor | None, peak: torch.Tensor, threshold: torch.Tensor | None,
          noise: torch.Tensor) -> torch.Tensor:
    """The exponential race over candidates values[n,K]; overwrites values."""
    dropped = None if threshold is None else values < threshold[:, None]
    weights = values.sub_(peak[:, None]).exp_().div_(noise)
    if dropped is not None:
        # After the division, so an E of 0 (a kept token's sure win) cannot make a dropped 0/0 NaN.
        weights.masked_fill_(dropped, 0)
    picks = weights.argmax(dim=-1)
    return picks if ids is None else ids.gather(1, picks[:, None])[:, 0]


def _pools(s: torch.Tensor, peak: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
           ) -> list[_Pool]:
    """The rows of s[R,V] grouped by candidate layout: rows with top_k or top_p race over their
    top candidates (_top_k_top_p), the others over the whole vocabulary."""
    count, vocab = s.shape
    if top_k is not None:
        top_k = top_k.masked_fill(top_k >= vocab, 0)   # keeping every token is no filter
    filtered = None
    if top_k is not None:
        filtered = top_k > 0
    if top_p is not None:
        filtered = top_p < 1 if filtered is None else filtered | (top_p < 1)
    num_filtered = 0 if filtered is None else int(filtered.sum())
    if num_filtered == 0:
        return [_Pool(None, s, None, None)]
    if num_filtered == count:
        return _top_k_top_p(s, peak, None, top_k, top_p)
    rows, plain = filtered.nonzero()[:, 0], (~filtered).nonzero()[:, 0]
    return (_top_k_top_p(s[rows], peak[rows], rows, _at(top_k, rows), _at(top_p, rows))
            + [_Pool(plain, s[plain], None, None)])


def _top_k_top_p(s: torch.Tensor, peak: torch.Tensor, origin: torch.Tensor | None, top_k: torch.Tensor | None,
                 top_p: torch.Tensor | None) -> list[_Pool]:
    """Thresholds for the rows of s[n,V] (drawn rows `origin`, None: all), looked for among a few
    candidates first; each row lands in the pool of the first candidate set that holds all its
    kept tokens."""
    vocab = s.shape[1]
    norm = None
    if top_p is not None:   # without top_k, top_p's mass is over the whole vocabulary
        norm = (s - peak[:, None]).exp_().sum(dim=-1).log_().add_(peak)
    pending, pools = None, []   # positions in s still open; None: all
    for size in CANDIDATES + (vocab,):
        width = vocab if 4 * size >= vocab else size   # topk of a large share is slower than sort
        open_rows = _at(s, pending)
        if width == vocab:
            values, ids = open_rows.sort(dim=-1, descending=True)
        else:
            values, ids = open_rows.topk(width, dim=-1)
        threshold, done = _threshold(values, _at(top_k, pending), _at(top_p, pending), _at(norm, pending),
                                     width == vocab)
        if done is None or bool(done.all()):
            pools.append(_Pool(_rows(origin, pending), values, ids, threshold))
            break
        settled, pending_here = done.nonzero()[:, 0], (~done).nonzero()[:, 0]
        if len(settled):
            pools.append(_Pool(_rows(origin, _rows(pending, settled)), values[settled], ids[settled],
                               threshold[settled]))
        pending = _rows(pending, pending_here)
    return pools


def _threshold(values: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None,
               norm: torch.Tensor | None, complete: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """values[n,K]: the K largest s per row, descending; top_k < V (0: off); norm: logsumexp of
    the whole row. Returns each row's threshold and whether it is settled: all its kept tokens
    are among the candidates (None: all are, as when complete)."""
    width, last = values.shape[1], values[:, -1]
    kth = has_k = inside = None
    if top_k is not None:
        has_k = top_k > 0
        # top_k > K reads the last candidate, which leaves the row unsettled below.
        kth = values.gather(1, (torch.where(has_k, top_k, width).clamp_(max=width) - 1)[:, None])[:, 0]
        # A top_k cut strictly inside the candidates leaves no tied token outside them.
        inside = has_k & (kth > last)
    threshold = None if kth is None else kth.masked_fill(~has_k, NEG_INF)
    if top_p is not None:
        kept = values
        if kth is not None:
            kept = values.masked_fill(values < kth[:, None], NEG_INF)
            norm = torch.where(inside | complete, torch.logsumexp(kept, dim=-1), norm)
        probs = kept.sub(norm[:, None]).exp_()
        before = probs.cumsum(dim=-1).sub_(probs)
        last_kept = (before < top_p[:, None]).sum(dim=-1).clamp_(min=1) - 1
        by_p = values.gather(1, last_kept[:, None])[:, 0].masked_fill_(top_p >= 1, NEG_INF)
        threshold = by_p if threshold is None else torch.maximum(threshold, by_p)
    if complete:
        return threshold, None
    done = threshold > last
    return threshold, done if has_k is None else done & (inside | ~has_k)


@dataclass
class SamplingRow:
    """One row of the per-row interface (the engine core's, until it builds SamplingMetadata
    itself): a row with a generator is seeded by the generator's seed."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]


def sample(logits: torch.Tensor, rows: list[SamplingRow], *, eos_token_ids: Collection[int] = (),
           generator: torch.Generator | None = None) -> SamplerOutput:
    """sample_batch for per-row inputs."""
    metadata = SamplingMetadata.from_rows(rows, device=logits.device)
    eos = torch.tensor(sorted(eos_token_ids), dtype=torch.long, device=logits.device) if eos_token_ids else None
    return sample_batch(logits, metadata, generator, eos)
