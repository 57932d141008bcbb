"""Logprob entries, and the text that names their tokens.

An entry is {token_id: Logprob} for one position: the top-N tokens (ranks 1..N) and the token
that was sampled (or, for prompt logprobs, the prompt's own). The sampled or prompt token is
named by its piece, the text it added (IncrementalDetokenizer.pieces, token_pieces), so the names
concatenate to the text; an alternative by the text it would have added there (continuations),
special tokens spelled out, so an eos among the alternatives reads as itself.
"""

from __future__ import annotations

from collections.abc import Sequence

from lepton.engine.detokenizer import PROMPT_CONTEXT, IncrementalDetokenizer, rust_backend
from lepton.outputs import Logprob

_INCOMPLETE = "\ufffd"


def _decode_all(tokenizer, sequences: list[list[int]]) -> list[str]:
    backend = rust_backend(tokenizer)
    if backend is not None:
        return backend.decode_batch(sequences, skip_special_tokens=False)
    return [tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            for ids in sequences]


def continuations(tokenizer, items: Sequence[tuple[Sequence[int], Sequence[int], Sequence[int]]]) -> list[list[str]]:
    """Per (shown, context, candidates): the text each candidate adds after ``context``, whose
    first ids ``shown`` decode to the text already shown: decode(context + [c]) past
    decode(shown), whose split last character, if any, does not count as shown. One batched
    decode for all items."""
    sequences = []
    for shown, context, candidates in items:
        sequences.append(list(shown))
        sequences.extend([*context, int(c)] for c in candidates)
    texts = iter(_decode_all(tokenizer, sequences))
    out = []
    for _, _, candidates in items:
        length = len(next(texts).rstrip(_INCOMPLETE))
        out.append([next(texts)[length:] for _ in candidates])
    return out


def token_pieces(tokenizer, token_ids: Sequence[int], skip_special_tokens: bool = True) -> list[str]:
    """The text each of ``token_ids`` adds when the sequence is detokenized from its start (an
    echoed prompt): the pieces concatenate to the sequence's text."""
    detok = IncrementalDetokenizer(tokenizer, (), skip_special_tokens=skip_special_tokens)
    for token in token_ids:
        detok.update((token,))
    detok.finish()
    return detok.pieces()


def logprob_entry(token: int, logprob: float, rank: int, top_ids, top_logprobs,
                  names: Sequence[str]) -> dict[int, Logprob]:
    """The entry of one position; ``names``: of top_ids, then of ``token``."""
    top_ids = list(top_ids or ())
    entry = {t: Logprob(v, r + 1, names[r]) for r, (t, v) in enumerate(zip(top_ids, top_logprobs or ()))}
    entry.setdefault(token, Logprob(logprob, rank, names[len(top_ids)]))
    return entry


def prompt_entries(tokenizer, prompt_token_ids: Sequence[int], first: int, token_ids, stats) -> list[dict]:
    """Entries of prompt positions first, first + 1, ...; stats: (logprobs, ranks, top ids, top
    logprobs) per position. An alternative is named by the text it would add after the few
    prompt tokens before it (one batched decode for them all); the prompt's own tokens are named
    by their pieces once all positions are in (name_prompt_tokens)."""
    rows = list(zip(token_ids, *stats))
    candidates = [[*(top_ids or ()), token] for token, _, _, top_ids, _ in rows]
    if tokenizer is None:
        names = [[str(t) for t in ids] for ids in candidates]
    else:
        contexts = [prompt_token_ids[max(0, p - PROMPT_CONTEXT):p] for p in range(first, first + len(rows))]
        names = continuations(tokenizer, [(c, c, ids) for c, ids in zip(contexts, candidates)])
    return [logprob_entry(*row, names=n) for row, n in zip(rows, names)]


def name_prompt_tokens(tokenizer, entries: list, prompt_token_ids: Sequence[int], skip_special_tokens: bool) -> None:
    """Name each prompt token of a complete prompt-logprobs list by its piece of the prompt."""
    if tokenizer is None or len(entries) != len(prompt_token_ids):
        return
    pieces = token_pieces(tokenizer, prompt_token_ids, skip_special_tokens)
    name_tokens(entries[1:], prompt_token_ids[1:], pieces[1:])


def name_tokens(entries: Sequence[dict], token_ids: Sequence[int], pieces: Sequence[str]) -> None:
    """Name each entry's own token by its (final) piece."""
    for token, entry, piece in zip(token_ids, entries, pieces):
        entry[token].decoded_token = piece
