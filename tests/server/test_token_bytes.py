"""Chat logprobs' ``bytes``: a token's raw bytes, also when it is only part of a character, and
per-token bytes that concatenate to the text's UTF-8."""

from __future__ import annotations

import pytest

from lepton.engine.logprobs import token_pieces
from lepton.entrypoints.server.token_bytes import piece_bytes, raw_token_bytes
from tests.models.conftest import make_bpe_tokenizer

TEXTS = ["这是一个示例文本。", "emoji 🚀👍🏽 and café", "plain ASCII text"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_tokens_concatenate_to_the_utf8_text(text):
    tok = make_bpe_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert b"".join(raw_token_bytes(tok, i) for i in ids) == text.encode("utf-8")
    assert any("\ufffd" in tok.decode([i]) for i in ids) or text.isascii()   # split characters occur


@pytest.mark.parametrize("text", TEXTS)
def test_piece_bytes_give_split_characters_their_own_bytes(text):
    tok = make_bpe_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = token_pieces(tok, ids)
    got = piece_bytes(tok, ids, pieces)
    assert b"".join(map(bytes, got)) == text.encode("utf-8")
    assert got == [list(raw_token_bytes(tok, i)) for i in ids]   # each token's own bytes


def test_piece_bytes_where_the_entries_do_not_spell_the_text():
    tok = make_bpe_tokenizer()
    ids = tok("中文", add_special_tokens=False)["input_ids"]
    assert len(ids) >= 3
    # A stop string cut the second character away: its tokens hold no bytes.
    pieces = token_pieces(tok, ids)
    cut = list(pieces)
    cut[-1] = ""
    got = piece_bytes(tok, ids, cut)
    assert b"".join(map(bytes, got)) == "中".encode("utf-8")
    # Bytes that never form a character read U+FFFD in the text, and in the bytes.
    lone = ids[:1]
    assert piece_bytes(tok, lone, token_pieces(tok, lone)) == [list("\ufffd".encode("utf-8"))]


def test_sentencepiece_byte_fallback_and_no_tokenizer():
    class Fallback:
        def convert_ids_to_tokens(self, token_id):
            return {7: "<0xE8>", 8: "▁the"}[token_id]

    assert raw_token_bytes(Fallback(), 7) == b"\xe8"
    assert raw_token_bytes(Fallback(), 8) is None   # "▁" is no byte: the text's bytes are used
    assert piece_bytes(Fallback(), [8], [" the"]) == [list(b" the")]
    assert raw_token_bytes(None, 3) is None
    assert piece_bytes(None, [3, 4], ["", "é"]) == [[], list("é".encode())]
