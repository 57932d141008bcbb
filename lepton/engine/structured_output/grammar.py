"""Grammars: parsed when a request is validated, compiled against the tokenizer off the step loop.

    grammar = build_grammar(params)           # xgrammar Grammar; ValueError names what is wrong
    compiler = GrammarCompiler(tokenizer, vocab_size, stop_token_ids)
    future = compiler.submit(params)          # Future[CompiledGrammar], one per distinct spec

Parsing (schema -> EBNF, regex -> EBNF, EBNF syntax) is cheap and catches every malformed spec,
so the input processor runs it and a bad request is refused before it is queued. Compiling
precomputes, for every grammar state, which of the vocabulary's tokens can follow: it takes
milliseconds to seconds, so it runs in a worker thread, and the compiled grammar is cached by
the spec's key (StructuredOutputsParams.key): a schema sent again is not compiled again.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from lepton.engine.structured_output.params import JSON_MAX_WHITESPACE, StructuredOutputsParams
from lepton.engine.structured_output.schema_check import check_schema

CACHE_SIZE = 256   # compiled grammars kept (least recently used dropped first)


@functools.lru_cache(maxsize=CACHE_SIZE)
def _grammar(key: tuple):
    import xgrammar as xgr

    kind, text = key[0], key[1]
    try:
        if kind == "json":
            check_schema(json.loads(text))
            return _json_strings(xgr.Grammar.from_json_schema(text, **_whitespace(key[2])))
        if kind == "json_object":   # any object: strict_mode off, so any keys are allowed
            return xgr.Grammar.from_json_schema('{"type": "object"}', strict_mode=False, **_whitespace(key[2]))
        if kind == "regex":
            return xgr.Grammar.from_regex(text)
        if kind == "choice":
            alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in text)
            return xgr.Grammar.from_ebnf(f"root ::= {alternatives}")
        return xgr.Grammar.from_ebnf(text)
    except RuntimeError as err:   # xgrammar's parse errors: keep the message, drop its source position
        message = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        message = message.split("] ", 1)[-1] if message.startswith("[") else message
        what = {"json": "json_schema", "json_object": "json_object"}.get(kind, kind)
        raise ValueError(f"invalid {what}: {message}") from None


# xgrammar writes a string with minLength/maxLength as a run of this class, which lets control
# characters through (invalid inside a JSON string); the grammar is re-read with JSON's own class.
_LOOSE_CHAR, _JSON_CHAR = r'[^\"\\\r\n]', r'[^\0-\x1f\"\\]'


def _json_strings(grammar):
    import xgrammar as xgr

    text = str(grammar)
    return xgr.Grammar.from_ebnf(text.replace(_LOOSE_CHAR, _JSON_CHAR)) if _LOOSE_CHAR in text else grammar


def _whitespace(any_whitespace: bool) -> dict:
    return {"any_whitespace": True} if any_whitespace else \
        {"any_whitespace": True, "max_whitespace_cnt": JSON_MAX_WHITESPACE}


def build_grammar(params: StructuredOutputsParams):
    """The xgrammar Grammar of ``params`` (cached); ValueError when the spec is malformed or uses
    JSON-schema features that would not be enforced."""
    return _grammar(params.key)


class GrammarCompiler:
    """Compiles grammars for one tokenizer, in one worker thread, each distinct spec once.

    vocab_size: the model's logits width (the bitmask's), which may differ from the tokenizer's
    length; stop_token_ids: the tokens that end a completion (the grammar allows them, and only
    them, once its root rule is complete)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids, max_threads: int | None = None):
        import xgrammar as xgr

        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids) or None)
        threads = max_threads or max(1, min(8, (os.cpu_count() or 2) // 2))
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=threads, cache_enabled=False)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lepton-grammar")
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def vocab_size(self) -> int:
        return self.tokenizer_info.vocab_size

    def submit(self, params: StructuredOutputsParams) -> Future:
        """The compiled grammar of ``params``, as a future (already done when cached)."""
        key = params.key
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._pool.submit(self._compile, params)
            self._cache[key] = future
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        future.add_done_callback(lambda f: f.exception() is not None and self._forget(key, f))
        return future

    def _compile(self, params: StructuredOutputsParams):
        return self._compiler.compile_grammar(build_grammar(params))

    def _forget(self, key: tuple, future: Future) -> None:
        """A failed compilation is not cached: the next request with this spec tries again."""
        with self._lock:
            if self._cache.get(key) is future:
                del self._cache[key]

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
