"""allowed_token_ids and bad_words: the tokens a row may not sample at this step.

For row b, with its output tokens o_1..o_n so far:
    allowed_token_ids A_b   z[t] = -inf for every t not in A_b
    bad_words W_b           for each word w = (w_1, ..., w_k) in token ids: z[w_k] = -inf when
                            (o_{n-k+2}, ..., o_n) = (w_1, ..., w_{k-1}); a one-token word is always
                            banned. So no output ever ends with a whole bad word, and none holds one.
Which tokens a bad word bans depends on the row's last few outputs, so the pairs (row, token) are
found on the host, a few list comparisons per row that has bad words; the masks are then two
scatters over the batch's logits. Rows without constraints come out bit-for-bit unchanged.

A bad word is tokenized as it would appear at the start of a text and after a space (byte-level
BPE gives "Ġword" a token of its own), both variants banned, as vLLM does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lepton.tokenizer import encode


@dataclass
class TokenMasks:
    """Flat (row, token) pairs of one step: ``allowed`` pairs with the rows they restrict
    (``restricted`` [B] bool), and ``banned`` pairs. A part no row uses is None."""

    allowed: tuple[torch.Tensor, torch.Tensor] | None = None
    restricted: torch.Tensor | None = None
    banned: tuple[torch.Tensor, torch.Tensor] | None = None


def bad_words_token_ids(tokenizer, words: Sequence[str]) -> list[list[int]]:
    """Each word's token ids, bare and after a space (distinct variants only)."""
    out: list[list[int]] = []
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = encode(tokenizer, text, add_special_tokens=False)[0]
            if ids and ids not in out:
                out.append(ids)
    return out


def bad_word_bans(words: Sequence[Sequence[int]], output: Sequence[int]) -> list[int]:
    """The tokens that would complete one of ``words`` after ``output``."""
    bans = []
    for word in words:
        prefix = len(word) - 1
        if prefix == 0 or (len(output) >= prefix and list(output[len(output) - prefix:]) == list(word[:-1])):
            bans.append(word[-1])
    return bans


def host_masks(rows: Sequence[tuple[int, Sequence[int] | None, Sequence[Sequence[int]] | None, Sequence[int]]],
               num_rows: int) -> dict[str, np.ndarray]:
    """The step's pairs as host arrays, from (batch row b, allowed ids or None, bad words' ids or
    None, output tokens so far) of each constrained row: keys allowed_rows/allowed_ids/restricted
    and banned_rows/banned_ids, present only when used."""
    arrays: dict[str, np.ndarray] = {}
    allowed = [(b, t) for b, ids, _, _ in rows if ids is not None for t in ids]
    if allowed:
        restricted = np.zeros(num_rows, dtype=np.bool_)
        restricted[[b for b, ids, _, _ in rows if ids is not None]] = True
        arrays["allowed_rows"] = np.array([b for b, _ in allowed], dtype=np.int64)
        arrays["allowed_ids"] = np.array([t for _, t in allowed], dtype=np.int64)
        arrays["restricted"] = restricted
    banned = [(b, t) for b, _, words, output in rows if words for t in bad_word_bans(words, output)]
    if banned:
        arrays["banned_rows"] = np.array([b for b, _ in banned], dtype=np.int64)
        arrays["banned_ids"] = np.array([t for _, t in banned], dtype=np.int64)
    return arrays


def token_masks(arrays: dict, device: torch.device | str | None = None) -> TokenMasks | None:
    """TokenMasks from host_masks' keys: numpy arrays (moved to ``device``) or device tensors."""
    if not arrays:
        return None

    def as_tensor(a) -> torch.Tensor:
        return a if isinstance(a, torch.Tensor) else torch.from_numpy(a).to(device)

    masks = TokenMasks()
    if "restricted" in arrays:
        masks.allowed = (as_tensor(arrays["allowed_rows"]), as_tensor(arrays["allowed_ids"]))
        masks.restricted = as_tensor(arrays["restricted"])
    if "banned_rows" in arrays:
        masks.banned = (as_tensor(arrays["banned_rows"]), as_tensor(arrays["banned_ids"]))
    return masks


def apply_token_masks(z: torch.Tensor, masks: TokenMasks) -> None:
    """-inf on every token a row may not sample (in place on the logits z [B, V])."""
    vocab = z.shape[1]
    if masks.allowed is not None:
        rows, ids = (t.to(z.device) for t in masks.allowed)
        keep = torch.zeros(z.shape, dtype=torch.bool, device=z.device)
        inside = ids < vocab   # an id past the lm_head (a larger embedding table) is never sampled
        keep[rows[inside], ids[inside]] = True
        keep |= ~masks.restricted.to(z.device)[:, None]
        z.masked_fill_(~keep, float("-inf"))
    if masks.banned is not None:
        rows, ids = (t.to(z.device) for t in masks.banned)
        inside = ids < vocab
        z[rows[inside], ids[inside]] = float("-inf")
