"""Chat logprobs' ``bytes``: a token's raw bytes, also when it is only part of a character."""

from __future__ import annotations

import pytest

from lepton.entrypoints.server.token_bytes import token_bytes
from tests.models.conftest import make_bpe_tokenizer


@pytest.mark.parametrize("text", ["这是一个示例文本。", "emoji 🚀👍🏽 and café", "plain ASCII text"])
def test_byte_level_tokens_concatenate_to_the_utf8_text(text):
    tok = make_bpe_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = [bytes(token_bytes(tok, i, tok.decode([i]))) for i in ids]
    assert b"".join(pieces) == text.encode("utf-8")
    assert any("\ufffd" in tok.decode([i]) for i in ids) or text.isascii()   # split characters occur


def test_sentencepiece_byte_fallback_and_no_tokenizer():
    class Fallback:
        def convert_ids_to_tokens(self, token_id):
            return {7: "<0xE8>", 8: "▁the"}[token_id]

    assert token_bytes(Fallback(), 7, "\ufffd") == [0xE8]
    assert token_bytes(Fallback(), 8, " the") == list(b" the")
    assert token_bytes(None, 3, "\ufffd") == list("\ufffd".encode())
