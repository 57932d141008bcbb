"""RequestOutputs -> OpenAI JSON: completions, chat completions, their stream chunks, logprobs.

Choice index = prompt index * n + sample index (OpenAI's order for several prompts with n > 1).
"""

from __future__ import annotations

import json
import time

from lepton.outputs import CompletionOutput, RequestOutput
from lepton.entrypoints.server.token_bytes import token_bytes


def sse(payload) -> str:
    """One server-sent event: ``data: <json>`` and a blank line."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _ranked(entry: dict, n: int) -> list:
    return sorted((lp for lp in entry.values() if lp.rank is not None and lp.rank <= n), key=lambda lp: lp.rank)


def _ranked_ids(entry: dict, n: int) -> list[tuple[int, object]]:
    return sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= n),
                  key=lambda item: item[1].rank)


def completion_logprobs(c: CompletionOutput, n: int, text_offset: int = 0) -> dict | None:
    """OpenAI's legacy completions format: tokens, token_logprobs, top_logprobs, text_offset."""
    if c.logprobs is None:
        return None
    tokens, values, tops, offsets = [], [], [], []
    offset = text_offset
    for token_id, entry in zip(c.token_ids, c.logprobs):
        chosen = entry[token_id]
        text = chosen.decoded_token or ""
        tokens.append(text)
        values.append(chosen.logprob)
        tops.append({lp.decoded_token or "": lp.logprob for lp in _ranked(entry, n)} if n else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(c: CompletionOutput, n: int, tokenizer=None) -> dict | None:
    """OpenAI's chat format: content = [{token, logprob, bytes, top_logprobs: [...]}, ...]."""
    if c.logprobs is None:
        return None

    def item(token_id: int, lp) -> dict:
        text = lp.decoded_token or ""
        return {"token": text, "logprob": lp.logprob, "bytes": token_bytes(tokenizer, token_id, text)}

    content = []
    for token_id, entry in zip(c.token_ids, c.logprobs):
        content.append(dict(item(token_id, entry[token_id]),
                            top_logprobs=[item(t, lp) for t, lp in _ranked_ids(entry, n)]))
    return {"content": content}


class ResponseBuilder:
    """Shapes outputs of one API call (several prompts, n samples each) as OpenAI objects."""

    def __init__(self, kind: str, request_id: str, model: str, n: int, num_logprobs: int | None,
                 tokenizer=None):
        self.kind, self.id, self.model, self.n = kind, request_id, model, n
        self.tokenizer = tokenizer
        self.num_logprobs = num_logprobs
        self.created = int(time.time())
        self.completion_tokens = 0
        self._offsets: dict[int, int] = {}
        self._started: set[int] = set()

    def _logprobs(self, c: CompletionOutput, index: int):
        if self.num_logprobs is None:
            return None
        if self.kind == "chat":
            return chat_logprobs(c, self.num_logprobs, self.tokenizer)
        offset = self._offsets.get(index, 0)
        self._offsets[index] = offset + len(c.text)
        return completion_logprobs(c, self.num_logprobs, offset)

    # ---- whole responses ------------------------------------------------------------------------
    def response(self, outputs: list[RequestOutput]) -> dict:
        choices, prompt_tokens = [], 0
        for i, out in enumerate(outputs):
            prompt_tokens += len(out.prompt_token_ids)
            for c in out.outputs:
                index = i * self.n + c.index
                self.completion_tokens += len(c.token_ids)
                choice = {"index": index, "logprobs": self._logprobs(c, index),
                          "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                if self.kind == "chat":
                    choice["message"] = {"role": "assistant", "content": c.text}
                else:
                    choice["text"] = c.text
                choices.append(choice)
        choices.sort(key=lambda ch: ch["index"])
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, "usage": usage(prompt_tokens, self.completion_tokens)}

    # ---- stream chunks ---------------------------------------------------------------------------
    def chunks(self, prompt_index: int, out: RequestOutput) -> list[dict]:
        """Chunks for one delta RequestOutput (one per completion that changed)."""
        chunks = []
        for c in out.outputs:
            index = prompt_index * self.n + c.index
            self.completion_tokens += len(c.token_ids)
            choice = {"index": index, "logprobs": self._logprobs(c, index), "finish_reason": c.finish_reason}
            if self.kind == "chat":
                delta = {"content": c.text}
                if index not in self._started:
                    delta["role"] = "assistant"
                    self._started.add(index)
                choice["delta"] = delta
            else:
                choice["text"] = c.text
            if c.finish_reason is not None:
                choice["stop_reason"] = c.stop_reason
            chunks.append(self._chunk([choice]))
        return chunks

    def _chunk(self, choices: list) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, "usage": None}

    def usage_chunk(self, prompt_tokens: int) -> dict:
        chunk = self._chunk([])
        chunk["usage"] = usage(prompt_tokens, self.completion_tokens)
        return chunk
