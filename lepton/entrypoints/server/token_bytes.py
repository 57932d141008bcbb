"""The raw bytes of a token, for OpenAI's chat logprobs ``bytes`` field.

A token can be part of a UTF-8 character (byte-level BPE splits CJK and emoji across tokens);
its decoded text is then U+FFFD, whose bytes say nothing. The vocabulary entry holds the real
bytes: byte-level BPE (GPT-2, Llama 3, Qwen) spells each byte as one printable character
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


def token_bytes(tokenizer, token_id: int, text: str) -> list[int]:
    """Bytes of ``token_id`` whose decoded text is ``text``."""
    if "\ufffd" not in text or tokenizer is None:
        return list(text.encode("utf-8"))
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str):
        match = _BYTE_TOKEN.fullmatch(piece)
        if match:
            return [int(match.group(1), 16)]
        table = _byte_level_decoder()
        if piece and all(ch in table for ch in piece):
            return [table[ch] for ch in piece]
    return list(text.encode("utf-8"))
