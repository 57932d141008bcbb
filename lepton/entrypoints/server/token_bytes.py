"""The raw bytes of a token, for OpenAI's chat logprobs ``bytes`` field.

A token can be part of a UTF-8 character (byte-level BPE splits CJK and emoji across tokens);
its decoded text alone is then U+FFFD, whose bytes say nothing. The vocabulary entry holds the
real bytes: byte-level BPE (GPT-2, Llama 3, Qwen) spells each byte as one printable character
(GPT-2's byte-to-unicode table below), sentencepiece byte fallback as "<0xAB>".
"""

from __future__ import annotations

import re
from functools import lru_cache

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's table: printable bytes stand for themselves, the other 68 map to chr(256 + i)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def raw_token_bytes(tokenizer, token_id: int) -> bytes | None:
    """The bytes of a vocabulary entry, where its spelling gives them (byte-level BPE, <0xAB>)."""
    if tokenizer is None:
        return None
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str):
        match = _BYTE_TOKEN.fullmatch(piece)
        if match:
            return bytes([int(match.group(1), 16)])
        table = _byte_level_decoder()
        if piece and all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
    return None


def piece_bytes(tokenizer, token_ids: list[int], pieces: list[str]) -> list[list[int]]:
    """Per token, the bytes it added to a text whose pieces (the text each token added) are
    ``pieces``: they concatenate to the text's UTF-8. The tokens of a character split across
    tokens (pieces "", ..., "中") share its bytes as their vocabulary entries spell them; where
    the entries do not spell the text exactly (bytes that never formed a character and read
    U+FFFD, a piece a stop string cut, a skipped special token), the last token of the group
    carries the piece's bytes and the others none."""
    out: list[list[int]] = []
    group: list[int] = []
    for token, piece in zip(token_ids, pieces):
        group.append(token)
        if not piece:
            continue
        raw = [raw_token_bytes(tokenizer, t) for t in group] if len(group) > 1 else None
        if raw and None not in raw and b"".join(raw) == piece.encode("utf-8"):
            out.extend(list(r) for r in raw)
        else:
            out.extend([] for _ in group[1:])
            out.append(list(piece.encode("utf-8")))
        group = []
    out.extend([] for _ in group)   # tokens after the last text (an eos that is not output)
    return out
