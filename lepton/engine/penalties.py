"""Logits processors run before sampling, in place on the sampler's own copy of z[B,V] (float32).

In this order, per row with its request's SamplingParams:
    min_tokens   while len(output) < min_tokens: z[t] = -inf for t in stop_token_ids and eos
                 (eos unless ignore_eos)
    logit_bias   z[t] += bias[t]
    repetition   for t in prompt | output: z[t] = z[t] / r if z[t] > 0 else z[t] * r    (HF transformers)
    frequency, presence, with c_t the count of t in the output (OpenAI):
                 z[t] -= frequency_penalty * c_t + presence_penalty * (c_t > 0)
Each builds flat (row, token) index lists once, then makes one indexed write, so the cost grows
with the number of tokens named, not with the vocabulary. Each returns the rows it changed.
Token ids >= V (an embedding table larger than the lm_head) can never be sampled and are skipped,
except in logit_bias, where naming one is the caller's error.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from itertools import chain

import numpy as np
import torch


def ban_stop_tokens(z: torch.Tensor, rows: Sequence, eos_token_ids: Collection[int]) -> list[int]:
    """min_tokens: -inf on the tokens that would end each row's completion too early."""
    vocab = z.shape[1]
    index_rows, index_tokens, changed = [], [], []
    for b, row in enumerate(rows):
        params = row.params
        if len(row.output_token_ids) >= params.min_tokens:
            continue
        eos = () if params.ignore_eos else eos_token_ids
        banned = [t for t in chain(params.stop_token_ids, eos) if t < vocab]
        if banned:
            changed.append(b)
            index_rows += [b] * len(banned)
            index_tokens += banned
    if changed:
        z[_index(index_rows, z), _index(index_tokens, z)] = float("-inf")
    return changed


def add_logit_bias(z: torch.Tensor, rows: Sequence) -> list[int]:
    vocab = z.shape[1]
    index_rows, index_tokens, values, changed = [], [], [], []
    for b, row in enumerate(rows):
        bias = row.params.logit_bias
        if bias:
            changed.append(b)
            index_rows += [b] * len(bias)
            index_tokens += bias.keys()
            values += bias.values()
    if changed:
        if max(index_tokens) >= vocab:
            raise ValueError(f"logit_bias names token {max(index_tokens)}, outside the vocabulary "
                             f"of {vocab} tokens")
        z.index_put_((_index(index_rows, z), _index(index_tokens, z)),
                     torch.tensor(values, dtype=z.dtype, device=z.device), accumulate=True)
    return changed


def apply_penalties(z: torch.Tensor, rows: Sequence) -> list[int]:
    """Repetition, then frequency and presence penalties, for the rows whose params ask."""
    changed = [b for b, row in enumerate(rows) if row.params.needs_penalties]
    repeat = [b for b in changed if rows[b].params.repetition_penalty != 1]
    if repeat:
        penalty = _per_row(z, rows, "repetition_penalty")
        r, t = _token_index(z, [rows[b].prompt_token_ids for b in repeat]
                            + [rows[b].output_token_ids for b in repeat], repeat + repeat)
        seen, p = z[r, t], penalty[r]
        # A token seen twice is written twice with the same value: penalized once.
        z[r, t] = torch.where(seen > 0, seen / p, seen * p)
    counted = [b for b in changed
               if rows[b].params.frequency_penalty != 0 or rows[b].params.presence_penalty != 0]
    if counted:
        r, t = _token_index(z, [rows[b].output_token_ids for b in counted], counted)
        z[r, t] = z[r, t] - _per_row(z, rows, "presence_penalty")[r]
        z.index_put_((r, t), -_per_row(z, rows, "frequency_penalty")[r], accumulate=True)
    return changed


def _index(values: list[int], z: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=z.device)


def _per_row(z: torch.Tensor, rows: Sequence, name: str) -> torch.Tensor:
    return torch.tensor([getattr(row.params, name) for row in rows], dtype=z.dtype, device=z.device)


def _token_index(z: torch.Tensor, seqs: list[Sequence[int]], row_ids: list[int]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) index tensors for every token of every sequence, seqs[i] belonging to row_ids[i]."""
    lengths = [len(s) for s in seqs]
    # np.fromiter reads Python ints ~8x faster than torch.tensor does.
    tokens = torch.from_numpy(np.fromiter(chain.from_iterable(seqs), np.int64, sum(lengths)))
    index_rows = torch.tensor(row_ids).repeat_interleave(torch.tensor(lengths))
    keep = (tokens >= 0) & (tokens < z.shape[1])
    return index_rows[keep].to(z.device), tokens[keep].to(z.device)
