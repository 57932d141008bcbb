"""RequestOutputs -> OpenAI JSON: completions, chat completions, their stream chunks, logprobs.

Choice index = prompt index * n + sample index (OpenAI's order for several prompts with n > 1).
"""

from __future__ import annotations

import json
import time

from lepton.engine.logprobs import token_pieces
from lepton.outputs import CompletionOutput, RequestOutput
from lepton.entrypoints.server.token_bytes import piece_bytes, raw_token_bytes


# Characters that str.splitlines() breaks lines at and json.dumps(ensure_ascii=False) leaves raw
# (it escapes the C0 controls itself). SSE ends lines at CR / LF only, but clients that split
# with splitlines (httpx's aiter_lines, for one) would cut an event holding one of these in two.
_SPLITLINES_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def event_json(payload) -> str:
    """Compact JSON for one SSE data line: UTF-8 kept, the line breaks of str.splitlines()
    escaped (they can only occur inside JSON strings, where \\uXXXX means the same text)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).translate(_SPLITLINES_BREAKS)


def sse(payload) -> str:
    """One server-sent event: ``data: <json>`` and a blank line."""
    return f"data: {event_json(payload)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    """OpenAI's usage; cached_tokens: prompt tokens served from the prefix cache."""
    body = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        body["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return body



def _value(lp) -> float:
    return max(lp.logprob, -9999.0)   # OpenAI's floor for -inf, which JSON cannot spell


def _ranked(entry: dict, n: int) -> list[tuple[int, object]]:
    """(token id, Logprob) of the top ``n`` alternatives, best first."""
    return sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= n),
                  key=lambda item: item[1].rank)


def _pieces(token_ids, entries) -> list[str]:
    """The text each sampled token added (the output processor names it so)."""
    return [entry[t].decoded_token or "" for t, entry in zip(token_ids, entries)]


def _id_name(token: int) -> str:
    return f"token_id:{token}"


def completion_logprobs(token_ids, entries, pieces, n: int, text_offset: int = 0, as_ids: bool = False) -> dict:
    """OpenAI's legacy completions format: tokens (the pieces, which concatenate to the text),
    token_logprobs, top_logprobs (the top ``n`` and the sampled token, keyed by text) and
    text_offset (where each piece starts in the text). An entry None (an echoed prompt's first
    token) has no logprob. as_ids (vLLM's return_tokens_as_token_ids): tokens and keys are
    spelled "token_id:<id>" instead, which names tokens whose text alone is not printable."""
    if as_ids:
        names = [_id_name(t) for t in token_ids]
        out = completion_logprobs(token_ids, entries, pieces, n, text_offset)
        out["tokens"] = names
        out["top_logprobs"] = [None if entry is None else
                               {**{_id_name(t): _value(lp) for t, lp in _ranked(entry, n)}, name: _value(entry[t])}
                               for t, entry, name in zip(token_ids, entries, names)]
        return out
    values, tops, offsets = [], [], []
    offset = text_offset
    for token, entry, piece in zip(token_ids, entries, pieces):
        offsets.append(offset)
        offset += len(piece)
        if entry is None:
            values.append(None)
            tops.append(None)
            continue
        value = _value(entry[token])
        values.append(value)
        top = {}
        for t, lp in _ranked(entry, n):
            top.setdefault(piece if t == token else lp.decoded_token or "", _value(lp))
        top[piece] = value   # an alternative spelled like the sampled token does not hide it
        tops.append(top)
    return {"tokens": list(pieces), "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _joined(first: dict | None, second: dict) -> dict:
    return second if first is None else {key: first[key] + second[key] for key in first}


def chat_logprobs(token_ids, entries, n: int, tokenizer=None, as_ids: bool = False) -> dict:
    """OpenAI's chat format: content = [{token, logprob, bytes, top_logprobs: [...]}, ...]. The
    tokens concatenate to the content and the bytes to its UTF-8 (token_bytes.piece_bytes);
    top_logprobs holds the top ``n`` and, when n >= 1, the sampled token."""
    pieces = _pieces(token_ids, entries)
    content = []
    for token, entry, piece, raw in zip(token_ids, entries, pieces, piece_bytes(tokenizer, token_ids, pieces)):
        chosen = {"token": piece, "logprob": _value(entry[token]), "bytes": raw}
        top = []
        for t, lp in _ranked(entry, n):
            if t == token:
                top.append(dict(chosen))
            else:
                text = lp.decoded_token or ""
                own = raw_token_bytes(tokenizer, t)
                top.append({"token": text, "logprob": _value(lp),
                            "bytes": list(own if own is not None else text.encode("utf-8"))})
        if n and all(t != token for t, _ in _ranked(entry, n)):
            top.append(dict(chosen))
        if as_ids:   # return_tokens_as_token_ids: each token spelled "token_id:<id>"
            chosen["token"] = _id_name(token)
            ranked = [t for t, _ in _ranked(entry, n)]
            ranked += [token] if len(top) > len(ranked) else []
            top = [dict(item, token=_id_name(t)) for item, t in zip(top, ranked)]
        content.append(dict(chosen, top_logprobs=top))
    return {"content": content}


def vllm_prompt_logprobs(prompt_token_ids, entries, n: int) -> list | None:
    """vLLM's prompt_logprobs: None for the first prompt token, then per token
    {token id: {logprob, rank, decoded_token}} with the prompt's token first, then the top ``n``."""
    if entries is None:
        return None

    def item(lp) -> dict:
        return {"logprob": _value(lp), "rank": lp.rank, "decoded_token": lp.decoded_token}

    out: list = [None]
    for token, entry in zip(prompt_token_ids[1:], entries[1:]):
        position = {str(token): item(entry[token])}
        for t, lp in _ranked(entry, n):
            position.setdefault(str(t), item(lp))
        out.append(position)
    return out


class ResponseBuilder:
    """Shapes outputs of one API call (several prompts, n samples each) as OpenAI objects.

    echo: completions start with the prompt's text (and, with logprobs, its tokens, whose first
    has no logprob); text_offset continues into the completion. prompt_logprobs: vLLM's field,
    per choice (completions) or per response (chat). generate=False (max_tokens=0 with echo):
    the one token the engine sampled is dropped, the choice is the prompt alone ("length").
    return_token_ids (vLLM's): each choice also holds its token_ids, and the prompt's ids come
    along (per choice for completions, per response for chat; in a stream, with the first chunk).
    tokens_as_ids: logprob tokens spelled "token_id:<id>". chat_echo: text the chat message
    starts with (chat echo: the last message's content, when it has the assistant's role).
    tool_calls: a tools.ToolCallShaper, which turns chat answers into content and tool_calls.
    """

    def __init__(self, kind: str, request_id: str, model: str, n: int, num_logprobs: int | None,
                 tokenizer=None, *, echo: bool = False, prompt_logprobs: int | None = None,
                 generate: bool = True, skip_special_tokens: bool = True, return_token_ids: bool = False,
                 tokens_as_ids: bool = False, chat_echo: str = "", tool_calls=None):
        self.kind, self.id, self.model, self.n = kind, request_id, model, n
        self.tokenizer = tokenizer
        self.num_logprobs = num_logprobs
        self.echo, self.num_prompt_logprobs, self.generate = echo, prompt_logprobs, generate
        self.skip_special_tokens = skip_special_tokens
        self.return_token_ids, self.tokens_as_ids, self.chat_echo = return_token_ids, tokens_as_ids, chat_echo
        self.tool_calls = tool_calls
        self._cached: dict[int, int] = {}        # prompt index -> its tokens served from the prefix cache
        self.created = int(time.time())
        self.completion_tokens = 0
        self._offsets: dict[int, int] = {}       # choice index -> text streamed so far (characters)
        self._started: set[int] = set()
        self._prompt_entries: dict[int, list] = {}   # prompt index -> its prompt logprobs (streams)
        self._echoes: dict[int, tuple[str, list[str]]] = {}

    def _echoed(self, prompt_index: int, out: RequestOutput) -> tuple[str, dict | None]:
        """The prompt's text and, with logprobs, its legacy-format logprobs."""
        if prompt_index not in self._echoes:
            ids = out.prompt_token_ids
            pieces = (token_pieces(self.tokenizer, ids, self.skip_special_tokens)
                      if self.tokenizer is not None else [""] * len(ids))
            self._echoes[prompt_index] = ("".join(pieces), pieces)
        text, pieces = self._echoes[prompt_index]
        if self.num_logprobs is None:
            return text, None
        entries = out.prompt_logprobs or self._prompt_entries.get(prompt_index) or [None] * len(pieces)
        return text, completion_logprobs(out.prompt_token_ids, entries, pieces, self.num_logprobs,
                                         as_ids=self.tokens_as_ids)

    def _choice(self, prompt_index: int, out: RequestOutput, c: CompletionOutput, stream: bool) -> dict | None:
        index = prompt_index * self.n + c.index
        first = index not in self._started
        self._started.add(index)
        token_ids, entries, text = c.token_ids, c.logprobs, c.text
        finish_reason, stop_reason = c.finish_reason, c.stop_reason
        if not self.generate:
            token_ids, entries, text = [], [] if entries is not None else None, ""
            finish_reason, stop_reason = ("length" if finish_reason is not None else None), None
            if stream and not first and finish_reason is None:
                return None
        self.completion_tokens += len(token_ids)
        choice: dict = {"index": index}
        want = self.num_logprobs is not None and entries is not None
        if self.return_token_ids:
            choice["token_ids"] = list(token_ids)
            if self.kind != "chat" and first:
                choice["prompt_token_ids"] = list(out.prompt_token_ids)
        if self.kind == "chat":
            choice["logprobs"] = (chat_logprobs(token_ids, entries, self.num_logprobs, self.tokenizer, self.tokens_as_ids)
                                  if want else None)
            text = self.chat_echo + text if first else text
            if stream:
                delta = {"content": text}
                if self.tool_calls is not None:   # content held where a call may begin (tools.py)
                    delta, finish_reason = self.tool_calls.delta(index, text, finish_reason)
                    if not (delta or first or finish_reason or want or self.return_token_ids):
                        return None
                choice["delta"] = {**delta, "role": "assistant"} if first else delta
            elif self.tool_calls is not None:
                choice["message"], finish_reason = self.tool_calls.message(text, finish_reason)
            else:
                choice["message"] = {"role": "assistant", "content": text}
        else:
            echo_text, echo_lp = self._echoed(prompt_index, out) if self.echo and first else ("", None)
            offset = self._offsets.get(index, 0) + len(echo_text)
            if want:
                pieces = _pieces(token_ids, entries)
                choice["logprobs"] = _joined(echo_lp, completion_logprobs(token_ids, entries, pieces,
                                                                          self.num_logprobs, offset, self.tokens_as_ids))
                offset += sum(map(len, pieces))
            else:
                choice["logprobs"] = None
                offset += len(text)
            self._offsets[index] = offset
            choice["text"] = echo_text + text
            if self.num_prompt_logprobs is not None and not stream:
                choice["prompt_logprobs"] = vllm_prompt_logprobs(out.prompt_token_ids, out.prompt_logprobs,
                                                                 self.num_prompt_logprobs)
        choice["finish_reason"] = finish_reason
        if not stream or finish_reason is not None:
            choice["stop_reason"] = stop_reason
        return choice

    # ---- whole responses ------------------------------------------------------------------------
    def response(self, outputs: list[RequestOutput]) -> dict:
        choices, prompt_tokens = [], 0
        for i, out in enumerate(outputs):
            prompt_tokens += len(out.prompt_token_ids)
            self._note_cached(i, out)
            choices += [self._choice(i, out, c, stream=False) for c in out.outputs]
        choices.sort(key=lambda ch: ch["index"])
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage(prompt_tokens)}
        if self.kind == "chat" and self.return_token_ids and outputs:
            body["prompt_token_ids"] = list(outputs[0].prompt_token_ids)
        if self.kind == "chat" and self.num_prompt_logprobs is not None and outputs:
            body["prompt_logprobs"] = vllm_prompt_logprobs(outputs[0].prompt_token_ids, outputs[0].prompt_logprobs,
                                                           self.num_prompt_logprobs)
        return body

    # ---- stream chunks ---------------------------------------------------------------------------
    def chunks(self, prompt_index: int, out: RequestOutput) -> list[dict]:
        """Chunks for one delta RequestOutput (one per completion that changed)."""
        if out.prompt_logprobs is not None:   # a delta carries them once: kept for later choices
            self._prompt_entries[prompt_index] = out.prompt_logprobs
        self._note_cached(prompt_index, out)
        chunks = []
        for c in out.outputs:
            first = prompt_index * self.n + c.index not in self._started
            choice = self._choice(prompt_index, out, c, stream=True)
            if choice is not None:
                chunks.append(self._chunk([choice]))
                if first and self.kind == "chat" and self.return_token_ids:
                    chunks[-1]["prompt_token_ids"] = list(out.prompt_token_ids)
        return chunks

    def _note_cached(self, prompt_index: int, out: RequestOutput) -> None:
        if out.num_cached_tokens is not None:
            self._cached[prompt_index] = out.num_cached_tokens

    def usage(self, prompt_tokens: int) -> dict:
        """Usage so far; cached_tokens once the engine has told how many prompt tokens it reused."""
        cached = sum(self._cached.values()) if self._cached else None
        return usage(prompt_tokens, self.completion_tokens, cached)

    def _chunk(self, choices: list) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, "usage": None}

    def usage_chunk(self, prompt_tokens: int) -> dict:
        chunk = self._chunk([])
        chunk["usage"] = self.usage(prompt_tokens)
        return chunk
