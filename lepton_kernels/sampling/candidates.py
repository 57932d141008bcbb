"""The candidate search of sample_from_probs: which tokens each filtered row races over.

A row with top_k or top_p races over the first candidate set found to hold all its kept tokens:
    its cut      with top_p, the tokens with p_i >= CUT_SHARE (1 - top_p) / V; without, those
                 at or above the min_p floor (one comparison and a nonzero over the vocabulary,
                 no sort; a guess, kept only where the candidates do decide the thresholds)
    top 64, top 1024 (torch.topk), then every token sorted
a row with min_p alone races over its cut, or else the whole vocabulary; an unfiltered row over
the whole vocabulary. Which stage a row settles in depends on its own probabilities and
parameters only. Thresholds are on p and keep tokens tied with them, as HF transformers does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CUT_SHARE = 16            # the cut's guess: tokens under CUT_SHARE * (1 - top_p) / V fall outside top_p
CUT_WIDTH = 1024          # the most candidates a row's cut may leave
CANDIDATES = (64, 1024)   # top-k sizes tried next, before a full sort
NEG_INF = float("-inf")


def at(x: torch.Tensor | None, index: torch.Tensor | None) -> torch.Tensor | None:
    """x[index], where index None stands for every row, in order (and x None for "not in use")."""
    return x if x is None or index is None else x[index]


def _rows(outer: torch.Tensor | None, inner: torch.Tensor | None) -> torch.Tensor | None:
    """Rows `inner` of a subset that is rows `outer` of the whole (None: all, in order)."""
    return outer if inner is None else inner if outer is None else outer[inner]


def _split(mask: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(rows where mask, rows where not): None for all rows, an empty tensor for none."""
    num, none = 0 if mask is None else int(mask.sum()), torch.empty(0, dtype=torch.long)
    if num == 0:
        return none, None
    return (None, none) if num == len(mask) else (mask.nonzero()[:, 0], (~mask).nonzero()[:, 0])


def _empty(index: torch.Tensor | None) -> bool:
    return index is not None and len(index) == 0


def _any(*masks: torch.Tensor | None) -> torch.Tensor | None:
    present = [m for m in masks if m is not None]
    return None if not present else present[0] if len(present) == 1 else torch.stack(present).any(dim=0)


@dataclass
class Pool:
    """Rows racing over the same candidates."""

    rows: torch.Tensor | None         # [n] positions among the drawn rows; None: all of them, in order
    values: torch.Tensor              # [n, K] the candidates' p, sorted descending unless ids is None,
                                      # padding -inf
    weights: torch.Tensor             # [n, K] their p, padding 0
    ids: torch.Tensor | None          # [n, K] their token ids; None: the whole vocabulary, in order
    threshold: torch.Tensor | None    # [n] the kept candidates are those >= threshold; None: all


@dataclass
class _Rows:
    """Filtered rows still looking for their candidates: p and the parameters; origin: their
    positions among the drawn rows (None: all, in order)."""

    origin: torch.Tensor | None
    p: torch.Tensor
    floor: torch.Tensor | None
    top_k: torch.Tensor | None
    top_p: torch.Tensor | None

    def take(self, index: torch.Tensor | None) -> _Rows:
        return _Rows(_rows(self.origin, index), *(at(getattr(self, name), index) for name in
                                                  ("p", "floor", "top_k", "top_p")))


def candidate_pools(p: torch.Tensor, floor: torch.Tensor | None, top_k: torch.Tensor | None,
                    top_p: torch.Tensor | None) -> list[Pool]:
    """The rows of p[R,V] grouped by candidates: a row with top_k or top_p
    races over the first candidate set found to hold all its kept tokens (its cut, the top 64,
    the top 1024, all tokens sorted); a row with min_p alone over its cut, or else the whole
    vocabulary; an unfiltered row over the whole vocabulary."""
    if top_k is not None:
        top_k = top_k.masked_fill(top_k >= p.shape[1], 0)   # keeping every token is no filter

    def sorting(rows: _Rows) -> torch.Tensor | None:
        return _any(None if rows.top_k is None else rows.top_k > 0, None if rows.top_p is None else rows.top_p < 1)

    rows = _Rows(None, p, floor, top_k, top_p)
    filtered, plain = _split(_any(sorting(rows), None if floor is None else floor > NEG_INF))
    pools = [] if _empty(plain) else [Pool(plain, at(p, plain), at(p, plain), None, None)]
    if _empty(filtered):
        return pools
    settled, rest = _cut_stage(rows.take(filtered))
    pools += settled
    if rest is not None:
        by_sort, floor_only = _split(sorting(rest))
        if not _empty(by_sort):
            pools += _sorted_stages(rest.take(by_sort))
        if not _empty(floor_only):
            wide = rest.take(floor_only)
            pools.append(Pool(wide.origin, wide.p, wide.p, None, wide.floor))
    return pools


def _cut_stage(rows: _Rows) -> tuple[list[Pool], _Rows | None]:
    """Candidates by value: with top_p, the tokens with p_i >= CUT_SHARE * (1 - top_p) / V (a
    guess that the tokens below hold less than 1 - top_p together; at most 1 / V, so the top
    token is one); without, those at or above the min_p floor. (Not both: top_p's mass counts
    every token top_k keeps, including those under the floor.) Rows with at most CUT_WIDTH
    candidates whose kept tokens all lie among them race over them, sorted; returns their pool
    and the rows still open."""
    vocab, candidates = rows.p.shape[1], None
    if rows.top_p is not None:   # top_p = 1: a share of 0, every token
        share = (1 - rows.top_p).mul_(CUT_SHARE / vocab).clamp_(max=1 / vocab)
        candidates = rows.p >= share[:, None]
    elif rows.floor is not None:
        candidates = rows.p >= rows.floor[:, None]
    if candidates is None:
        return [], rows
    row, token = candidates.nonzero().unbind(dim=1)   # each row's candidates, in vocabulary order
    counts = torch.bincount(row, minlength=len(candidates))
    fewest, most = (int(x) for x in torch.aminmax(counts))
    if fewest > CUT_WIDTH:
        return [], rows
    kept, width = counts, most
    if most > CUT_WIDTH:   # rows with more candidates drop out here
        kept = counts.masked_fill(counts > CUT_WIDTH, 0)
        width, fits = int(kept.max()), kept[row] > 0
        row, token = row[fits], token[fits]
    column = torch.arange(len(row), device=row.device).sub_((kept.cumsum(dim=0) - kept)[row])
    ids = torch.zeros(len(counts), width, dtype=torch.long, device=row.device).index_put_((row, column), token)
    padding = torch.arange(width, device=row.device) >= counts[:, None]
    values, order = rows.p.gather(1, ids).masked_fill_(padding, NEG_INF).sort(dim=-1, descending=True)
    ids = ids.gather(1, order)
    weights = values.clamp(min=0)   # padding (-inf) sorts last and weighs 0
    threshold, done = _threshold(values, weights, rows, counts=counts)
    return _settle(rows, values, weights, ids, threshold, done if most <= CUT_WIDTH else done & (kept > 0))


def _sorted_stages(rows: _Rows) -> list[Pool]:
    """Rows with top_k or top_p: thresholds among the top 64, then the top 1024 tokens, then all
    of them sorted; each row lands in the pool of the first set that holds all its kept tokens."""
    vocab, pools = rows.p.shape[1], []
    for size in CANDIDATES + (vocab,):
        width = vocab if 4 * size >= vocab else size   # topk of a large share is slower than sort
        if width == vocab:
            values, ids = rows.p.sort(dim=-1, descending=True)
        else:
            values, ids = rows.p.topk(width, dim=-1)
        weights = values
        threshold, done = _threshold(values, weights, rows, last=None if width == vocab else values[:, -1])
        settled, rows = _settle(rows, values, weights, ids, threshold, done)
        pools += settled
        if rows is None:
            break
    return pools


def _settle(rows: _Rows, values: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
            threshold: torch.Tensor | None, done: torch.Tensor | None) -> tuple[list[Pool], _Rows | None]:
    """The pool of the rows done (None: all), the min_p floor joined to their threshold, and
    the rows still open (None: none)."""
    ok, rest = _split(done) if done is not None else (None, torch.empty(0))
    pools = []
    if not _empty(ok):
        floor, threshold = at(rows.floor, ok), at(threshold, ok)
        if floor is not None:
            threshold = floor if threshold is None else torch.maximum(threshold, floor)
        pools.append(Pool(_rows(rows.origin, ok), at(values, ok), at(weights, ok), at(ids, ok), threshold))
    return pools, None if _empty(rest) else rows.take(rest)


def _threshold(values: torch.Tensor, weights: torch.Tensor, rows: _Rows, *, counts: torch.Tensor | None = None,
               last: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Each row's top_k / top_p threshold (None: neither is on) from its candidates values[n,K],
    sorted descending, and their p; and whether the row is settled (None: all are). The
    candidates are all tokens >= a cut, the first `counts` of each row (the rest padding); or the
    K largest, `last` the smallest of them (a token outside may tie with it); or all tokens."""
    width = values.shape[1]
    threshold = kth = has_k = mass = target = None
    if rows.top_k is not None:
        has_k = rows.top_k > 0
        # Rows without top_k read the last candidate, which masks nothing below; top_k > K
        # reads it too, and such a row stays unsettled.
        kth = values.gather(1, torch.where(has_k, rows.top_k.clamp(max=width), width)[:, None] - 1)[:, 0]
        threshold = kth.masked_fill(~has_k, NEG_INF)
    if rows.top_p is not None:
        target, p_off = rows.top_p, rows.top_p >= 1   # of the whole vocabulary's mass, 1
        if kth is not None:   # top_p's mass is then that of the top_k kept tokens
            weights = weights.masked_fill(values < kth[:, None], 0)
            target = torch.where(has_k, weights.sum(dim=-1, dtype=torch.float64) * target, target)
        # float64 sums: the kept set does not hang on the order a device adds in. The last kept
        # token is the first whose running mass reaches the target.
        mass = weights.cumsum(dim=-1, dtype=torch.float64)
        last_kept = torch.searchsorted(mass, target.double()[:, None]).clamp_(max=width - 1)
        by_p = values.gather(1, last_kept)[:, 0].masked_fill_(p_off, NEG_INF)
        threshold = by_p if threshold is None else torch.maximum(threshold, by_p)
    if counts is not None:   # kth is a real candidate, and top_p's prefix ends among the candidates
        ends = None if mass is None else p_off | (mass[:, -1] >= target)
        fits_k = None if has_k is None else ~has_k | (rows.top_k <= counts)
        done = ends if fits_k is None else fits_k if ends is None else ends & fits_k
        return threshold, done if done is not None else torch.ones_like(counts, dtype=torch.bool)
    if last is None:
        return threshold, None
    done = threshold > last   # no token outside can tie with a kept one
    return threshold, done if has_k is None else done & (~has_k | (kth > last))
