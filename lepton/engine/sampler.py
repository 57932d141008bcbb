"""The batched sampler: one vectorized pass over the next-token logits of the whole batch.

For each row of logits z[V] (float32) and its request's SamplingParams:
    finite    NaN or +inf anywhere, or every entry -inf: the row is replaced by zeros (so it cannot
              disturb the others), flagged, and its token is 0
    logprobs  log_softmax(z), the raw model distribution: the sampled token's value and rank, and
              the top-N, for the rows that ask
    z <- min_tokens bans, logit_bias, repetition / frequency / presence penalties (lepton/penalties.py)
    greedy    (temperature 0): argmax z
    otherwise s = z / temperature, keep {i : s_i >= t} where t is the largest of
                  top_k    the top_k-th largest s
                  top_p    s of the last token of the smallest prefix of the sorted tokens (after
                           top_k) whose softmax mass reaches top_p, at least one token
                  min_p    max s + log(min_p), that is p_i >= min_p * max p
              (tokens tied with t stay, as in HF transformers), and draw
                  token = argmax_{kept i} exp(s_i - max s) / E_i,    E_i ~ Exp(1)
              the exponential race, an exact draw from softmax(s) restricted to the kept tokens.
A row with its own generator draws E over the whole vocabulary from it, once per step, so a
seeded request's tokens depend on its seed alone, never on its batch mates; the other rows share
one batched draw from the shared generator.

Cost: top_k / top_p thresholds are looked for among the top 64, then the top 1024 tokens
(torch.topk), and only rows whose kept set is wider get a full sort; rows whose kept set lies
within their candidates race over the candidates alone.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from lepton.engine.penalties import add_logit_bias, apply_penalties, ban_stop_tokens
from lepton.sampling_params import SamplingParams

CANDIDATES = (64, 1024)   # top-k sizes tried before a full sort


@dataclass
class SamplingRow:
    params: SamplingParams
    generator: torch.Generator | None   # the request's own; None: the shared one
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]


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


def sample(logits: torch.Tensor, rows: list[SamplingRow], *, eos_token_ids: Collection[int] = (),
           generator: torch.Generator | None = None) -> SamplerOutput:
    """Sample one token per row of logits[B,V] (see the module doc)."""
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits must be [len(rows), V] = [{len(rows)}, V], got {list(logits.shape)}")
    z = logits.float()
    best, token_ids = z.max(dim=-1)   # max propagates NaN: one pass finds every bad row
    finite = best.isfinite()
    finite_list = finite.tolist()
    if not all(finite_list):
        z = z.clone() if z is logits else z
        z[~finite] = 0
    asked = [b for b, row in enumerate(rows) if row.params.logprobs is not None]
    raw = torch.log_softmax(_take(z, asked), dim=-1) if asked else None
    z, changed = _process(z, logits, rows, eos_token_ids)
    redo = sorted(b for b in changed if rows[b].params.greedy)
    if redo:
        token_ids[redo] = _take(z, redo).argmax(dim=-1)
    drawn = [b for b, row in enumerate(rows) if not row.params.greedy]
    if drawn:
        token_ids[drawn] = _draw(_take(z, drawn), [rows[b] for b in drawn], generator)
    token_ids.masked_fill_(~finite, 0)
    out = SamplerOutput(token_ids.tolist(), [None] * len(rows), [None] * len(rows),
                        [None] * len(rows), [None] * len(rows), finite_list)
    if asked:
        num_top = max(rows[b].params.logprobs for b in asked)
        stats = _logprob_stats(raw, _take(token_ids, asked), num_top)
        for b, value, rank, ids, lps in zip(asked, *stats):
            n = rows[b].params.logprobs
            out.logprobs[b], out.ranks[b], out.top_ids[b], out.top_logprobs[b] = value, rank, ids[:n], lps[:n]
    return out


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


def _take(x: torch.Tensor, index: list[int]) -> torch.Tensor:
    """x[index] for increasing row numbers: x itself when they are all its rows. Never write to it."""
    if len(index) == x.shape[0]:
        return x
    return x.index_select(0, torch.tensor(index, device=x.device))


def _process(z: torch.Tensor, logits: torch.Tensor, rows: list[SamplingRow],
             eos_token_ids: Collection[int]) -> tuple[torch.Tensor, set[int]]:
    """Run the logits processors on a copy of z; returns it and the rows they changed."""
    if not any(len(row.output_token_ids) < row.params.min_tokens or row.params.logit_bias
               or row.params.needs_penalties for row in rows):
        return z, set()
    z = z.clone() if z is logits else z
    changed = set(ban_stop_tokens(z, rows, eos_token_ids))
    changed.update(add_logit_bias(z, rows))
    changed.update(apply_penalties(z, rows))
    return z, changed


@dataclass
class _Pool:
    """Rows (positions in the drawn subset) racing over the same candidate layout."""

    rows: torch.Tensor          # [n]
    values: torch.Tensor        # [n, K] candidate s, sorted descending, or whole rows of s
    ids: torch.Tensor | None    # [n, K] their token ids; None: values is in vocabulary order
    threshold: torch.Tensor     # [n] top_k / top_p threshold, -inf when neither is on


def _draw(z: torch.Tensor, rows: list[SamplingRow], generator: torch.Generator | None) -> torch.Tensor:
    """Temperature, top_k, top_p and min_p, then the exponential race, for logits z[R,V]."""
    device, (count, vocab) = z.device, z.shape
    params = [row.params for row in rows]
    s = z / torch.tensor([p.temperature for p in params], dtype=z.dtype, device=device)[:, None]
    peak = s.amax(dim=-1)
    # min_p = 0 gives log 0 = -inf: no threshold.
    min_p = peak + torch.tensor([p.min_p for p in params], dtype=z.dtype, device=device).log()
    filtered = [i for i, p in enumerate(params) if p.top_k > 0 or p.top_p < 1]
    plain = [i for i, p in enumerate(params) if not (p.top_k > 0 or p.top_p < 1)]
    pools = _top_k_top_p(s, peak, filtered, params) if filtered else []
    if plain:
        index = torch.tensor(plain, device=device)
        values = s if len(plain) == count else s[index]
        pools.append(_Pool(index, values, None, torch.full((len(plain),), float("-inf"), device=device)))
    own = [i for i, row in enumerate(rows) if row.generator is not None]
    own_noise = torch.empty(len(own), vocab, dtype=s.dtype, device=device)
    for j, i in enumerate(own):   # torch has no batched form for per-request streams
        _exponential_(own_noise[j], rows[i].generator)
    slot = torch.full((count,), -1, dtype=torch.long, device=device)
    slot[own] = torch.arange(len(own), device=device)
    shared = [(pool, slot[pool.rows] < 0) for pool in pools]
    size = sum(int(mask.sum()) * pool.values.shape[1] for pool, mask in shared)
    flat = torch.empty(size, dtype=s.dtype, device=device)
    _exponential_(flat, generator)
    token_ids, offset = torch.empty(count, dtype=torch.long, device=device), 0
    for pool, mask in shared:
        noise, offset = _pool_noise(pool, mask, slot, own_noise, flat, offset)
        threshold = torch.maximum(pool.threshold, min_p[pool.rows])
        token_ids[pool.rows] = _race(pool, peak[pool.rows], threshold, noise)
    return token_ids


def _pool_noise(pool: _Pool, shared: torch.Tensor, slot: torch.Tensor, own_noise: torch.Tensor,
                flat: torch.Tensor, offset: int) -> tuple[torch.Tensor, int]:
    """E[n,K] for the pool's candidates: its shared rows' part of `flat`, from `offset` on, and
    its own-generator rows' draws over the vocabulary, read at their candidate ids."""
    n, width = pool.values.shape
    size = int(shared.sum()) * width
    drawn = flat[offset:offset + size].view(-1, width)
    if size == n * width:
        return drawn, offset + size
    mine = own_noise[slot[pool.rows[~shared]]]
    mine = mine if pool.ids is None else mine.gather(1, pool.ids[~shared])
    if size == 0:
        return mine, offset
    noise = torch.empty(n, width, dtype=flat.dtype, device=flat.device)
    noise[shared], noise[~shared] = drawn, mine
    return noise, offset + size


def _exponential_(out: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Fill ``out`` with Exp(1) draws as -log(U), U ~ Uniform[0, 1): on CPU about 4x faster than
    Tensor.exponential_ (U = 0 gives +inf, a weight of 0: that token simply loses the race)."""
    return out.uniform_(generator=generator).log_().neg_()


def _race(pool: _Pool, peak: torch.Tensor, threshold: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The exponential race over the pool's candidates; overwrites pool.values."""
    keep = pool.values >= threshold[:, None] if bool((threshold > float("-inf")).any()) else None
    weights = pool.values.sub_(peak[:, None]).exp_()
    if keep is not None:
        weights.mul_(keep)
    # An exact 0 noise would turn a dropped token's 0 / 0 into NaN, which argmax picks.
    picks = weights.div_(noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(dim=-1)
    return picks if pool.ids is None else pool.ids.gather(1, picks[:, None])[:, 0]


def _top_k_top_p(s: torch.Tensor, peak: torch.Tensor, filtered: list[int], params: list[SamplingParams]
                 ) -> list[_Pool]:
    """Thresholds for the rows of s[R,V] with top_k or top_p, looked for among a few candidates
    first; each row lands in the pool of the first candidate set that holds all its kept tokens."""
    device, vocab = s.device, s.shape[1]
    pending = torch.tensor(filtered, device=device)   # rows of s still open
    rest = torch.arange(len(filtered), device=device)   # their positions in `filtered`
    top_k = torch.tensor([params[i].top_k if 0 < params[i].top_k < vocab else 0 for i in filtered],
                         device=device)   # 0: off
    top_p = torch.tensor([params[i].top_p for i in filtered], dtype=s.dtype, device=device)
    norm = torch.zeros(len(filtered), dtype=s.dtype, device=device)
    if bool((top_k == 0).any()):   # without top_k, top_p's mass is over the whole vocabulary
        wide = pending[top_k == 0]
        shift = peak[wide]
        norm[top_k == 0] = s[wide].sub_(shift[:, None]).exp_().sum(dim=-1).log_() + shift
    pools = []
    for size in CANDIDATES + (vocab,):
        width = min(vocab, max(size, int(top_k[rest].max()) + 1))
        width = vocab if 4 * width >= vocab else width   # topk of a large share is slower than sort
        open_rows = s if len(pending) == len(s) else s[pending]
        if width == vocab:
            values, ids = open_rows.sort(dim=-1, descending=True)
        else:
            values, ids = open_rows.topk(width, dim=-1)
        threshold, done = _threshold(values, top_k[rest], top_p[rest], norm[rest], width == vocab)
        pools.append(_Pool(pending[done], values[done], ids[done], threshold[done]))
        pending, rest = pending[~done], rest[~done]
        if not len(rest):
            break
    return pools


def _threshold(values: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, norm: torch.Tensor,
               complete: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """values[n,K]: the K largest s per row, descending; top_k < K (0: off); norm: logsumexp of
    the whole row where top_k is off. Returns each row's threshold and whether it is settled:
    all its kept tokens are among the candidates, as they are when complete."""
    width, last = values.shape[1], values[:, -1]
    has_k = top_k > 0
    kth = values.gather(1, torch.where(has_k, top_k - 1, width - 1)[:, None])[:, 0]
    kept = values.masked_fill(values < kth[:, None], float("-inf"))
    # A top_k cut strictly inside the candidates leaves no tied token outside them.
    inside = has_k & (kth > last)
    norm = torch.where(inside | complete, torch.logsumexp(kept, dim=-1), norm)
    probs = kept.sub_(norm[:, None]).exp_()
    before = probs.cumsum(dim=-1).sub_(probs)
    last_kept = (before < top_p[:, None]).sum(dim=-1).clamp(min=1) - 1
    by_p = values.gather(1, last_kept[:, None])[:, 0].masked_fill(top_p >= 1, float("-inf"))
    threshold = torch.where(has_k, torch.maximum(kth, by_p), by_p)
    if complete:
        return threshold, torch.ones_like(has_k)
    return threshold, (threshold > last) & (inside | ~has_k)
