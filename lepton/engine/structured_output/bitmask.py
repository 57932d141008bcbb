"""The grammar's token mask, applied to a batch's logits in one vectorized pass.

A bitmask row is ceil(V / 32) int32 words: bit j of word w (least significant first) is 1 when
token 32 * w + j may come next under the row's grammar, 0 when it may not. For the constrained
rows b (``rows``) of the logits z [B, V]:
    z[b, t] = -inf   where the bit of t is 0, and for every t past the mask's 32 * W tokens
Rows not in ``rows`` are not touched, so they come out bit-for-bit unchanged.
"""

from __future__ import annotations

import torch


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """bitmask [C, W] int32 -> allowed [C, vocab] bool (False past the mask's 32 * W tokens)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    # An arithmetic shift keeps the sign bit, but the & 1 reads only bit j after shifting by j.
    allowed = ((bitmask[:, :, None] >> shifts) & 1).bool().reshape(bitmask.shape[0], -1)
    if allowed.shape[1] >= vocab:
        return allowed[:, :vocab]
    pad = torch.zeros(allowed.shape[0], vocab - allowed.shape[1], dtype=torch.bool, device=allowed.device)
    return torch.cat([allowed, pad], dim=1)


def apply_token_bitmask(z: torch.Tensor, grammar: tuple[torch.Tensor, torch.Tensor]) -> None:
    """-inf on every token the grammar forbids, in place on z [B, V]; ``grammar`` is (bitmask
    [C, W] int32, rows [C] int64), the constrained rows in batch order, each row once."""
    bitmask, rows = grammar
    bitmask, rows = bitmask.to(z.device), rows.to(z.device)
    allowed = unpack_bitmask(bitmask, z.shape[1])
    if rows.numel() == z.shape[0]:   # every row constrained (rows are 0..B-1 in order)
        z.masked_fill_(~allowed, float("-inf"))
        return
    z[rows] = z[rows].masked_fill_(~allowed, float("-inf"))
