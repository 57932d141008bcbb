"""Incremental detokenization of one generated sequence, for streaming, with stop strings.

Each step decodes a small window of ids: the ids of the previous emitted chunk (the prefix),
then the ids not yet emitted. The text past decode(prefix) is emitted once it does not end in
U+FFFD, so a character whose UTF-8 bytes are split across byte-level tokens appears only when
complete. The first window starts with the last few prompt ids, so tokenizers that drop the
leading space of the first token (sentencepiece, Metaspace) keep " the" after a prompt. Fast
tokenizers run this loop in Rust (tokenizers' DecodeStream); others decode the window with
tokenizer.decode. finish() flushes what is left as a full decode would render it (U+FFFD).

Stop strings are searched in the new text plus the previous max_stop_len - 1 characters only,
and get_next_delta holds that many characters back, so a stop string is never partly streamed.
No clean_up_tokenization_spaces: that whole-text heuristic cannot be applied to a stream. Exact
for byte-level BPE; with <0xXX> byte-fallback tokens, a run of invalid bytes may be rendered
differently from a full decode (which turns a valid byte next to invalid ones into U+FFFD too).

Each token's piece is the text its update added (logprobs name tokens by it, logprobs.py): the
pieces concatenate to the text, stop-string cuts included. A token that ends inside a character
adds "" and the token that completes it adds the whole character; a token whose text is still
pending or may yet be cut is not settled (see settled()).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat

try:
    from tokenizers import Tokenizer as _RustTokenizer
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21: the window decode in Python does the work
    _RustTokenizer = DecodeStream = None

PROMPT_CONTEXT = 5  # prompt ids decoded before the first output id (enough for a leading space)
MAX_PENDING = 16    # ids without new text before the window is settled (a character has <= 4 bytes)
_INCOMPLETE = "\ufffd"


def rust_backend(tokenizer):
    """The tokenizers.Tokenizer behind a transformers fast tokenizer (or the object itself)."""
    if _RustTokenizer is None or tokenizer is None:
        return None
    if isinstance(tokenizer, _RustTokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    return backend if isinstance(backend, _RustTokenizer) else None


class IncrementalDetokenizer:
    """Output text of one sequence, updated with each sampled token.

        detok = IncrementalDetokenizer(tokenizer, prompt_ids, stop=["\\n\\n"])
        matched = detok.update([token_id])          # every step; a stop string, or None
        send(detok.get_next_delta(finished=False))  # when streaming
        text = detok.finish()                       # once, when the sequence ends
    """

    __slots__ = ("tokenizer", "skip_special_tokens", "stop", "include_stop_str_in_output",
                 "stopped", "_backend", "_stream", "_window", "_read", "_prefix_text", "_chunks",
                 "_length", "_unsent", "_tail", "_holdback", "_finished", "_ends", "_settled", "_scanned")

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], *, skip_special_tokens: bool = True,
                 stop: Sequence[str] = (), include_stop_str_in_output: bool = False):
        stop = tuple(stop)
        if stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids")
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.include_stop_str_in_output = include_stop_str_in_output
        self.stopped = False                 # a stop string matched; the text is final
        self._finished = False
        self._chunks: list[str] = []         # the text, in pieces; .text joins them
        self._length = 0
        self._unsent: list[str] = []         # text not yet handed out by get_next_delta
        self._tail = ""                      # last _holdback characters of the text
        self._holdback = max(map(len, stop), default=1) - 1
        self._ends: list[int] = []           # per token fed: the text's length after it (before cuts)
        self._settled = self._scanned = 0    # settled(): tokens settled, tokens looked at
        self._backend = rust_backend(tokenizer)
        # Window of ids being decoded: [0, _read) was emitted (decodes to _prefix_text), the rest not.
        self._window = [int(t) for t in prompt_token_ids[-PROMPT_CONTEXT:]] if tokenizer is not None else []
        self._read = len(self._window)
        self._prefix_text = self._decode(self._window) if self._window else ""
        if self._prefix_text.endswith(_INCOMPLETE):
            # The prompt ends inside a character: decode the output alone, as a full decode of
            # the output ids would.
            self._window, self._read, self._prefix_text = [], 0, ""
        self._stream = None
        if self._backend is not None and DecodeStream is not None:
            try:
                self._stream = DecodeStream(list(self._window), skip_special_tokens)
            except TypeError:  # tokenizers without prefill ids: keep the Python window decode
                self._stream = None

    @property
    def holdback(self) -> int:
        """Characters held back from the end of the text while running (max stop length - 1)."""
        return self._holdback

    @property
    def text(self) -> str:
        """The output text so far (complete characters only until finish())."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def update(self, new_token_ids: Sequence[int], check_stop: bool = True) -> str | None:
        """Append newly sampled ids. Returns the stop string that matched (the text then ends
        before it, or after it with include_stop_str_in_output), else None. ``check_stop=False``
        (before min_tokens) only records the text; a stop string that ends later still counts.
        The text of several ids given at once is the last one's piece."""
        before = self._length
        matched = self._update(new_token_ids, check_stop)
        if new_token_ids:
            self._ends.extend(repeat(before, len(new_token_ids) - 1))
            self._ends.append(self._length)
        return matched

    def _update(self, new_token_ids: Sequence[int], check_stop: bool) -> str | None:
        if self.tokenizer is None or self.stopped or self._finished or not new_token_ids:
            return None
        if self._stream is None and len(new_token_ids) > 1:
            # The window decode looks for a clean end after every id, not only after the batch.
            for token in new_token_ids:
                matched = self._update([token], check_stop)
                if matched is not None:
                    return matched
            return None
        self._window.extend(new_token_ids)
        chunk = self._step(new_token_ids)
        if not chunk:
            if len(self._window) - self._read > MAX_PENDING:
                return self._settle(check_stop)
            return None
        # The window restarts at the ids of this chunk: they are the next prefix.
        del self._window[:self._read]
        self._read = len(self._window)
        if self._stream is None:
            self._prefix_text = self._decode(self._window)
        return self._append(chunk, check_stop)

    def _settle(self, check_stop: bool) -> str | None:
        """Many ids in a row added no text (skipped special tokens, or bytes that never form a
        character): emit them as a full decode renders them and restart the window after them,
        so the window, and the cost of a step, stay bounded."""
        prefix = self._prefix_text if self._stream is None else self._decode(self._window[:self._read])
        # Emit up to the last id after which the text ends on a whole character (a split
        # character has at most 4 bytes, so a few tries find it); the ids after it stay pending.
        end, text = len(self._window), None
        for cut in range(len(self._window), max(self._read, len(self._window) - 8), -1):
            candidate = self._decode(self._window[:cut])
            if not candidate.endswith(_INCOMPLETE):
                end, text = cut, candidate[len(prefix):]
                break
        if text is None:   # no whole character anywhere: render the bytes as a full decode does
            text = self._decode(self._window)[len(prefix):]
        pending = self._window[end:]
        self._window = self._window[:end][-PROMPT_CONTEXT:]
        self._read = len(self._window)
        self._prefix_text = self._decode(self._window)
        if self._prefix_text.endswith(_INCOMPLETE):
            self._window, self._read, self._prefix_text = [], 0, ""
        if self._stream is not None:
            self._stream = DecodeStream(list(self._window), self.skip_special_tokens)
        matched = self._append(text, check_stop) if text else None
        if pending and matched is None:
            return self._update(pending, check_stop)
        return matched

    def get_next_delta(self, finished: bool) -> str:
        """Text added since the previous call. Unless finished (or stopped), the last
        max_stop_len - 1 characters are held back: they may be the start of a stop string."""
        if not self._unsent:
            return ""
        pending = self._unsent[0] if len(self._unsent) == 1 else "".join(self._unsent)
        cut = len(pending) if finished or self.stopped else len(pending) - self._holdback
        if cut <= 0:
            self._unsent = [pending]
            return ""
        self._unsent = [pending[cut:]] if cut < len(pending) else []
        return pending[:cut]

    def finish(self) -> str:
        """End of the sequence: flush ids still waiting for the rest of a character, rendered as
        a full decode renders them (U+FFFD). Returns the final text."""
        if not self._finished and self.tokenizer is not None and not self.stopped \
                and self._read < len(self._window):
            prefix = self._prefix_text if self._stream is None else self._decode(self._window[:self._read])
            full = self._decode(self._window)
            if len(full) > len(prefix):
                self._append(full[len(prefix):])
                if self._ends:   # the flushed text is the last token's
                    self._ends[-1] = self._length
        self._finished = True
        return self.text

    # ---- pieces: the text each token added ----------------------------------------------------
    @property
    def num_sent_chars(self) -> int:
        """Characters get_next_delta has handed out so far."""
        return self._length - sum(map(len, self._unsent))

    def pieces(self, start: int = 0, stop: int | None = None) -> list[str]:
        """The text tokens start..stop-1 (in the order fed) added, cut as the text was: the
        pieces of all tokens concatenate to ``text``. A token never fed (an eos whose text is not
        output) added ""."""
        text, ends = self.text, self._ends
        stop = len(ends) if stop is None else stop
        length = len(text)
        prev = 0 if start == 0 else min(ends[start - 1], length) if start <= len(ends) else length
        out = []
        for i in range(start, stop):
            end = min(ends[i], length) if i < len(ends) else length
            out.append(text[prev:end] if end > prev else "")
            prev = max(prev, end)
        return out

    def settled(self, limit: int) -> int:
        """How many tokens, from the first, have a final piece within the first ``limit``
        characters: the count ends on a token that added text, so a token whose character is
        not complete yet (or a skipped special token) waits for the token that adds text after
        it. ``limit`` may only grow between calls (the characters handed out so far)."""
        ends, k, i = self._ends, self._settled, self._scanned
        prev = ends[i - 1] if i else 0
        while i < len(ends) and ends[i] <= limit:
            if ends[i] > prev:
                k = i + 1
            prev = ends[i]
            i += 1
        self._settled, self._scanned = k, i
        return k

    @property
    def context(self) -> tuple[list[int], list[int]]:
        """(ids whose text was shown, all ids decoded now): what the next id's text follows
        (lepton.engine.logprobs.continuations)."""
        return self._window[:self._read], list(self._window)

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def _step(self, new_token_ids: Sequence[int]) -> str | None:
        """The window's text past the prefix, or None while it ends inside a character."""
        if self._stream is not None:
            try:
                ids = new_token_ids[0] if len(new_token_ids) == 1 else list(new_token_ids)
                return self._stream.step(self._backend, ids)
            except Exception:  # noqa: BLE001 (e.g. DecodeStream's InvalidPrefix): decode in Python
                self._stream = None
                self._prefix_text = self._decode(self._window[:self._read])
        text = self._decode(self._window)
        if len(text) <= len(self._prefix_text) or text.endswith(_INCOMPLETE):
            return None
        return text[len(self._prefix_text):]

    def _append(self, chunk: str, check_stop: bool = True) -> str | None:
        """Add decoded text; cut it at the earliest stop string, if one now appears."""
        if self.stop:
            window = self._tail + chunk
            match = self._find_stop(window, len(self._tail)) if check_stop else None
            if match is not None:
                start, stop = match
                end = start + (len(stop) if self.include_stop_str_in_output else 0)
                self._truncate(self._length - len(self._tail) + end, chunk)
                self.stopped = True
                return stop
            if self._holdback:
                self._tail = window[-self._holdback:]
        self._chunks.append(chunk)
        self._unsent.append(chunk)
        self._length += len(chunk)
        return None

    def _find_stop(self, window: str, old: int) -> tuple[int, str] | None:
        """(start, stop string) of the earliest stop string in window that reaches past index old."""
        best = None
        for stop in self.stop:
            start = window.find(stop, max(0, old - len(stop) + 1))
            if start >= 0 and (best is None or start < best[0]):
                best = (start, stop)
        return best

    def _truncate(self, length: int, chunk: str) -> None:
        """The text becomes (text + chunk)[:length]; what was not handed out yet is cut alike."""
        text = (self.text + chunk)[:length]
        sent = self._length - sum(map(len, self._unsent))
        self._chunks = [text]
        self._length = len(text)
        self._unsent = [text[sent:]] if len(text) > sent else []
