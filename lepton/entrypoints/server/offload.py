"""Work that must not run on the event loop, and the size limits checked before it.

Tokenizing, chat templating, detokenizing and encoding a large JSON answer take from
milliseconds to seconds (a 1 MB prompt: about a second). On the event loop they would stall
every stream and every /health probe meanwhile, so routes hand them to ``Offload``, a small
thread pool. Hugging Face fast tokenizers release the GIL while they encode, and the JSON
encoder (json_codec.py) works in short pieces, so the loop keeps running while they do.

The limits on what a request asks the pool for (the number of prompts, their characters) are
checked on the loop first: a request that could never be served is refused (413) before any of
it is tokenized.
"""

from __future__ import annotations

import asyncio
import functools
import os
from concurrent.futures import ThreadPoolExecutor

from fastapi.responses import Response

from lepton.entrypoints.server.errors import APIError
from lepton.entrypoints.server.json_codec import dumps

# A few threads: one huge request then delays other requests' tokenization, not the loop.
THREADS = max(2, min(4, os.cpu_count() or 1))


class Offload:
    def __init__(self, threads: int = THREADS):
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="lepton-offload")

    async def run(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the pool; its exception (an APIError too) is raised here."""
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.pool, call)

    async def json(self, fn, *args, **kwargs) -> Response:
        """The JSON answer ``fn(*args, **kwargs)`` returns, built and encoded on the pool."""
        body = await self.run(lambda: dumps(fn(*args, **kwargs)).encode("utf-8"))
        return Response(body, media_type="application/json")

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def decode(tokenizer, token_ids: list[int]) -> str:
    """``tokenizer.decode(token_ids)``. A transformers fast tokenizer's decode holds the GIL all
    along (about 0.1 s for 500k ids, a stall of the event loop even from another thread); its
    Rust backend's batch decode gives the same text and releases it, so that is used whenever
    the tokenizer adds nothing of its own (no override, no clean-up of spaces)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and _plain_fast_decode(type(tokenizer)) and not tokenizer.clean_up_tokenization_spaces:
        return backend.decode_batch([token_ids], skip_special_tokens=False)[0]
    return tokenizer.decode(token_ids)


@functools.lru_cache(maxsize=8)
def _plain_fast_decode(cls) -> bool:
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        return False
    return (issubclass(cls, PreTrainedTokenizerFast) and cls.decode is PreTrainedTokenizerFast.decode
            and cls._decode is PreTrainedTokenizerFast._decode)


# ---- limits checked before tokenizing -----------------------------------------------------------
def text_chars(value) -> int:
    """Characters of the text a request would tokenize: its strings, however nested."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(text_chars(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        # A token-id list is not tokenized: skip it without walking it.
        if value and isinstance(value[0], int):
            return 0
        return sum(text_chars(v) for v in value)
    return 0


def check_chars(num_chars: int, limit: int, param: str) -> None:
    """413 naming ``param`` when a request's text is more than the server tokenizes at once."""
    if num_chars > limit:
        raise APIError(413, f"{param} holds {num_chars} characters of text, more than this server "
                            f"tokenizes for one request ({limit}, --max-prompt-chars); send less or split it",
                       param=param)
