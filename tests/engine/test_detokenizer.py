"""IncrementalDetokenizer against the tokenizer's own full decode.

Tokens are fed one at a time (or in random chunks), as the engine does; the reference is
tokenizer.decode of all ids at once. Three decode paths are checked: tokenizers' DecodeStream
("stream"), the Python window decode on a fast tokenizer ("window", as with tokenizers that
lack DecodeStream), and a slow tokenizer without a Rust backend (ByT5, one token per byte).
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lepton.engine.detokenizer as detokenizer
from lepton.engine.detokenizer import IncrementalDetokenizer
from tests.models.conftest import CORPUS, make_bpe_tokenizer

TEXTS = CORPUS + [
    "这是一个示例文本。",
    "日本語のテキストです。カタカナとひらがな、漢字。",
    "Emoji 🙂🚀👍🏽 and flags 🇫🇷 and a family 👨‍👩‍👧.",
    "Mixed 中文 and English, 한국어 and ASCII 123 — « ça va ? »",
    "\n\n  tabs\tand   spaces  \n",
]


@pytest.fixture(scope="module")
def bpe():
    return make_bpe_tokenizer(max_length=4096)


def make_metaspace_tokenizer(llama_style: bool):
    """Sentencepiece-style BPE: '▁' marks a space, and the decoder drops the leading space of the
    first token. llama_style: Llama-2's decoder (Replace, ByteFallback, Fuse, Strip) and <0xXX>
    tokens for characters outside the vocabulary; else the Metaspace decoder (T5, Unigram)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if llama_style:
        state = json.loads(tok.to_str())
        vocab = state["model"]["vocab"]
        for b in range(256):
            vocab.setdefault(f"<0x{b:02X}>", len(vocab))
        state["model"]["byte_fallback"] = True
        tok = Tokenizer.from_str(json.dumps(state))
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    else:
        tok.decoder = decoders.Metaspace(prepend_scheme="first")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=4096)


@pytest.fixture(params=["stream", "window"])
def path(request, monkeypatch):
    if request.param == "window":
        monkeypatch.setattr(detokenizer, "DecodeStream", None)
    return request.param


def stream(detok: IncrementalDetokenizer, ids: list[int], chunks: list[int] | None = None):
    """Feed ids (one at a time, or in the given chunk sizes) until a stop string matches.
    Returns (stop string or None, deltas streamed with finished=False, final delta, final text,
    text after each step)."""
    matched, deltas, texts, i = None, [], [], 0
    sizes = iter(chunks or [])
    while i < len(ids) and matched is None:
        n = next(sizes, 1)
        matched = detok.update(ids[i:i + n])
        i += n
        deltas.append(detok.get_next_delta(finished=False))
        texts.append(detok.text)
    final = detok.finish()
    return matched, deltas, detok.get_next_delta(finished=True), final, texts


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_stream_equals_decode(bpe, path, text):
    prompt = bpe.encode("<|user|>Hi</s><|assistant|>", add_special_tokens=False)
    ids = bpe.encode(text, add_special_tokens=False)
    _, deltas, last, final, texts = stream(IncrementalDetokenizer(bpe, prompt), ids)
    assert final == bpe.decode(ids, skip_special_tokens=True) == text
    assert "".join(deltas) + last == final
    # Mid-stream: complete characters only; all of them once the ids so far end on a whole one
    # (a token that ends in a partial character is held back whole until it completes).
    for i, partial in enumerate(texts, 1):
        so_far = bpe.decode(ids[:i])
        assert so_far.startswith(partial) and "\ufffd" not in partial
        assert partial == so_far or so_far.endswith("\ufffd")


@pytest.mark.parametrize("text", TEXTS)
def test_slow_tokenizer_stream_equals_decode(text):
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    ids = tok.encode(text, add_special_tokens=False)
    _, deltas, last, final, _ = stream(IncrementalDetokenizer(tok, tok.encode("x é")), ids, [1, 2, 3] * 50)
    assert final == tok.decode(ids) == text
    assert "".join(deltas) + last == final


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.characters(blacklist_characters="\ufffd", blacklist_categories=("Cs",)),
                    max_size=40),
       prompt=st.text(max_size=10), seed=st.integers(0, 2**16))
def test_random_text_streams_exactly(bpe, path, text, prompt, seed):
    ids = bpe.encode(text, add_special_tokens=False)
    chunks = [random.Random(seed).randint(1, 3) for _ in ids]
    prompt_ids = bpe.encode(prompt, add_special_tokens=False)
    _, deltas, last, final, texts = stream(IncrementalDetokenizer(bpe, prompt_ids), ids, chunks)
    assert final == bpe.decode(ids, skip_special_tokens=True) == text
    assert "".join(deltas) + last == final
    assert all("\ufffd" not in t for t in texts)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 399), max_size=30), prompt=st.lists(st.integers(0, 399), max_size=8),
       skip=st.booleans())
def test_random_ids_finish_equals_decode(bpe, path, ids, prompt, skip):
    """Any ids, invalid UTF-8 and special tokens included (and a prompt that may end inside a
    character): after finish() the text is what decode renders, U+FFFD included."""
    detok = IncrementalDetokenizer(bpe, prompt, skip_special_tokens=skip)
    _, deltas, last, final, _ = stream(detok, ids)
    assert final == bpe.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) + last == final


def test_prompt_ending_inside_a_character(bpe, path):
    ids = bpe.encode("示例文本", add_special_tokens=False)
    cut = next(i for i in range(1, len(ids)) if bpe.decode(ids[:i]).endswith("\ufffd"))
    final = stream(IncrementalDetokenizer(bpe, ids[:cut]), ids[cut:])[3]
    assert final == bpe.decode(ids[cut:])


def expected_after_stop(tok, ids, stop: str, include: bool) -> str:
    full = tok.decode(ids, skip_special_tokens=True)
    start = full.index(stop)
    return full[:start + (len(stop) if include else 0)]


def check_stop(tok, ids, stops, winner, include=False, chunks=None):
    detok = IncrementalDetokenizer(tok, [], stop=stops, include_stop_str_in_output=include)
    matched, deltas, last, final, _ = stream(detok, ids, chunks)
    expected = expected_after_stop(tok, ids, winner, include)
    assert matched == winner
    assert final == expected == detok.text
    assert "".join(deltas) + last == final and last == ""  # a stop flushes the held-back text
    # Nothing of the stop string is streamed before it is found (the last step found it).
    assert len("".join(deltas[:-1])) <= len(expected) - (len(winner) if include else 0)
    if not include:
        assert all(s not in final for s in stops)


@pytest.mark.parametrize("include", [False, True])
def test_ascii_stop_spanning_two_tokens(bpe, path, include):
    text = "The quick brown fox jumps over the lazy dog. Hello world!"
    ids = bpe.encode(text, add_special_tokens=False)
    pieces = [bpe.decode([i]) for i in ids]
    stop = "jumps over"
    assert not any(stop in p for p in pieces)  # really spans tokens
    check_stop(bpe, ids, [stop], stop, include)


@pytest.mark.parametrize("include", [False, True])
def test_cjk_stop(bpe, path, include):
    ids = bpe.encode("这是一个示例文本。我们喜欢机器学习。", add_special_tokens=False)
    check_stop(bpe, ids, ["示例"], "示例", include)
    check_stop(bpe, ids, ["示例", "xyzzy"], "示例", include, chunks=[2, 3, 1, 4] * 9)


def test_stop_at_first_token(bpe, path):
    ids = bpe.encode("Hello world! How are you today?", add_special_tokens=False)
    first = bpe.decode(ids[:1])
    check_stop(bpe, ids, [first[:2], "today"], first[:2])
    check_stop(bpe, ids, [first], first, include=True)


def test_earliest_stop_wins(bpe, path):
    ids = bpe.encode("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)
    check_stop(bpe, ids, ["lazy", "fox", "quick"], "quick")
    check_stop(bpe, ids, ["lazy", "fox jumps over the"], "fox jumps over the")
    check_stop(bpe, ids, ["dog", "brown fox"], "brown fox", chunks=[50])  # one step, earliest start


def test_no_stop_streams_everything(bpe, path):
    text = "The quick brown fox jumps over the lazy dog."
    ids = bpe.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(bpe, [], stop=["cat", "a much longer stop string"])
    matched, deltas, last, final, _ = stream(detok, ids)
    assert matched is None and final == text and "".join(deltas) + last == text
    assert len(last) == len("a much longer stop string") - 1  # the held-back tail


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(bpe, path, skip):
    ids = (bpe.encode("<|assistant|>", add_special_tokens=False) + bpe.encode("Hello 世界", add_special_tokens=False)
           + [bpe.eos_token_id] + bpe.encode(" more", add_special_tokens=False) + [bpe.eos_token_id])
    _, deltas, last, final, _ = stream(IncrementalDetokenizer(bpe, [1], skip_special_tokens=skip), ids)
    assert final == bpe.decode(ids, skip_special_tokens=skip)
    assert ("</s>" in final) is not skip
    assert "".join(deltas) + last == final


# Without byte fallback, characters outside the tiny vocabulary become <unk>: ASCII text only.
@pytest.mark.parametrize("llama_style,text", [
    (True, "The quick brown fox jumps over the lazy dog."),
    (True, "Hello world! How are you today? 这是一个示例文本。"),
    (True, "Paged attention 日本語 🙂 stores keys"),
    (False, "The quick brown fox jumps over the lazy dog."),
    (False, "Hello world! How are you today?"),
])
def test_metaspace_keeps_leading_space(path, llama_style, text):
    tok = make_metaspace_tokenizer(llama_style)
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.unk_token_id not in ids
    words = [i for i in range(2, len(ids)) if tok.convert_ids_to_tokens(ids[i]).startswith("▁")]
    for cut in words[:3]:
        prompt, output = [tok.bos_token_id] + ids[:cut], ids[cut:]
        full, head = tok.decode(prompt + output), tok.decode(prompt)
        assert full.startswith(head)
        assert not tok.decode(output).startswith(" ")  # a lone decode loses the space
        _, deltas, last, final, _ = stream(IncrementalDetokenizer(tok, prompt), output)
        assert final == full[len(head):] and final.startswith(" ")
        assert "".join(deltas) + last == final


def test_metaspace_without_prompt_equals_decode(path):
    tok = make_metaspace_tokenizer(llama_style=True)
    ids = tok.encode("Hello world 日本語 🙂", add_special_tokens=False)
    assert stream(IncrementalDetokenizer(tok, []), ids)[3] == tok.decode(ids)


@pytest.fixture(scope="module")
def llama_style():
    return make_metaspace_tokenizer(llama_style=True)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 555), max_size=12), prompt=st.lists(st.integers(0, 555), max_size=6),
       skip=st.booleans())
def test_byte_fallback_random_ids(llama_style, path, ids, prompt, skip):
    """<0xXX> tokens at random: DecodeStream gives up on some (ByteFallback renders a valid byte
    as U+FFFD when the bytes after it are invalid) and the window decode takes over. Whenever the
    text is valid, it equals decode(prompt + output) past decode(prompt)."""
    tok = llama_style
    _, deltas, last, final, _ = stream(IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip), ids)
    assert "".join(deltas) + last == final
    full, head = tok.decode(prompt + ids, skip_special_tokens=skip), tok.decode(prompt, skip_special_tokens=skip)
    if "\ufffd" not in full + head and prompt:
        assert final == full[len(head):]
    if "\ufffd" not in full and not prompt:
        assert final == full


def test_no_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        IncrementalDetokenizer(None, [1, 2], stop=["x"])
    detok = IncrementalDetokenizer(None, [1, 2])
    assert detok.update([5]) is None
    assert detok.get_next_delta(finished=True) == "" and detok.finish() == "" and detok.text == ""


def test_empty_stop_string_rejected(bpe):
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(bpe, [], stop=["a", ""])


@pytest.mark.parametrize("use_stream", [True, False])
def test_long_runs_without_text_keep_the_window_bounded(bpe, use_stream, monkeypatch):
    """Hundreds of ids that add no text (skipped special tokens) must not make every later step
    decode an ever-growing window; the text still equals a full decode."""
    if not use_stream:
        monkeypatch.setattr(detokenizer, "DecodeStream", None)
    silent = bpe.convert_tokens_to_ids("</s>")
    words = bpe("hello 示例 world", add_special_tokens=False)["input_ids"]
    ids = words + [silent] * 300 + words + [silent] * 40 + words
    detok = IncrementalDetokenizer(bpe, [5, 6], skip_special_tokens=True)
    deltas = []
    for token in ids:
        detok.update([token])
        assert len(detok._window) <= detokenizer.PROMPT_CONTEXT + detokenizer.MAX_PENDING + 1
        deltas.append(detok.get_next_delta(False))
    detok.finish()
    deltas.append(detok.get_next_delta(True))
    assert "".join(deltas) == detok.text == bpe.decode(ids, skip_special_tokens=True)
