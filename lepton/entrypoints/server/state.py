"""Per-server state and the request plumbing shared by the routes of api_server.py: model and
limit checks, tokenization, and running requests on the AsyncEngine (streamed or whole).

Tokenizing and chat templating run on the offload pool (offload.py), after the count and
character limits are checked on the event loop; the loop itself never waits for them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from pathlib import Path

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from lepton.engine.async_engine import AsyncEngine, EngineStepError, StreamBackpressureError
from lepton.engine.input_processor import Prompt
from lepton.entrypoints.server.errors import APIError
from lepton.entrypoints.server.metrics import ServerMetrics
from lepton.entrypoints.server.offload import Offload, check_chars, text_chars
from lepton.entrypoints.server.middleware import KEY_ID_STATE
from lepton.entrypoints.server.protocol import message_dicts
from lepton.entrypoints.server.responses import SSE_DONE, ResponseBuilder, sse
from lepton.entrypoints.server.tools import check_template_renders_tools
from lepton.model_executor.config_checks import read_generation_config
from lepton.tokenizer import apply_chat_template

# max_prompt_chars: text one request may have tokenized (2 Mi characters: about half a million
# tokens of English, several full contexts of a long-context model, a few seconds of tokenizing);
# max_stream_buffer_tokens: output tokens a stream may have waiting for its reader (AsyncEngine).
DEFAULT_LIMITS = dict(max_n=16, max_logprobs=20, max_stop=16, max_prompts=256, max_pending=1024,
                      max_prompt_chars=2 << 20, max_stream_buffer_tokens=1024)


def _generation_defaults(path: Path) -> dict:
    # Checked when the engine loaded (a bad default fails at startup, not on every request).
    return read_generation_config(path)


class _ReleasingStream(StreamingResponse):
    """An SSE response that lets go of its engine requests however it ends. A client that leaves
    before the first chunk cancels the response before its body generator ever ran, and a
    generator that never ran never runs its cleanup: its requests would run on, never read."""

    def __init__(self, content, release):
        super().__init__(content, media_type="text/event-stream")
        self._release = release

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


class ServerState:
    def __init__(self, engine, served_model_name, chat_template, limits: dict):
        self.engine = engine
        self.async_engine = (AsyncEngine(engine, max_buffered_tokens=limits["max_stream_buffer_tokens"])
                             if engine.is_generative else None)
        self.offload = Offload()
        self.names = list(served_model_name or [Path(engine.model_path).name])
        self.chat_template = chat_template
        self.limits = limits
        self.defaults = _generation_defaults(Path(engine.model_path))
        self.metrics = ServerMetrics(self.async_engine, model_name=self.names[0])
        self.cache_salt_by_api_key = False   # --cache-salt-by-api-key (build_app sets it)
        self.tool_call_parser: str | None = None   # --tool-call-parser (build_app sets it)

    # ---- checks -----------------------------------------------------------------------------------
    def check_model(self, model: str | None) -> str:
        if model is not None and model not in self.names:
            raise APIError(404, f"The model `{model}` does not exist; this server serves "
                                f"{', '.join(self.names)}", param="model", code="model_not_found")
        return model or self.names[0]

    def generative(self, what: str) -> AsyncEngine:
        if self.async_engine is None:
            raise APIError(400, f"{what} needs a causal language model; this server runs an embedding "
                                "model (use /v1/embeddings)", param="model")
        if not self.async_engine.is_running:
            raise APIError(503, "the engine loop has stopped")
        return self.async_engine

    def submit(self, requests) -> list:
        """Queue the requests on the engine now (429 past max_pending; 413 for a request that alone
        holds more prompts than max_pending, which no retry would cure), so the next request's
        check already counts them; returns their output queues."""
        if len(requests) > self.limits["max_pending"]:   # could never fit: not a "retry later"
            raise APIError(413, f"this request holds {len(requests)} prompts, more than the server queues at "
                                f"once ({self.limits['max_pending']}, --max-pending); split it")
        # Finished requests whose client has not read them yet hold their output: they count.
        pending = self.async_engine.num_waiting() + self.async_engine.num_unread()
        if pending + len(requests) > self.limits["max_pending"]:
            raise APIError(429, f"too many requests queued or unread (limit {self.limits['max_pending']}); "
                                "retry later")
        try:
            return [(r.request_id, self.async_engine.submit(r)) for r in requests]
        except ValueError as err:
            raise APIError(400, str(err)) from None

    def make_request(self, request_id: str, prompt: Prompt, params, label: str, cache_salt: str | None = None,
                     priority: int = 0):
        """The engine's input processor validates; its ValueError is the client's 400. Lower
        ``priority`` values are scheduled first (vLLM's priority scheduling)."""
        try:
            return self.engine.input_processor.process(request_id, prompt, params, label=label,
                                                       cache_salt=cache_salt, priority=priority)
        except ValueError as err:
            raise APIError(400, str(err)) from None

    def cache_salt(self, body, raw: Request) -> str | None:
        """A request's prefix-cache partition: its body's cache_salt; with --cache-salt-by-api-key,
        nested inside its API key's own partition, so no two keys ever share a cached block."""
        key_id = getattr(raw.state, KEY_ID_STATE, None) if self.cache_salt_by_api_key else None
        if key_id is None:
            return body.cache_salt
        if body.cache_salt is None:
            return f"key:{key_id}"
        # Hashed, so the nested salt stays within the engine's length limit whatever the body's is.
        return f"key:{key_id}/{hashlib.sha256(body.cache_salt.encode()).hexdigest()}"

    async def prompts(self, prompt, truncate: int | None = None) -> list[Prompt]:
        """A completions prompt (string, strings, token ids, lists of token ids) -> Prompts. The
        limits are checked first; then, on the offload pool, each prompt is tokenized and checked
        against the model's length, so the first that can never run ends the work (400)."""
        items = self.split(prompt, "prompt")
        return await self.offload.run(self._generation_prompts, items, truncate)

    def truncated(self, token_ids: list[int], keep: int | None) -> list[int]:
        """truncate_prompt_tokens: the last ``keep`` ids (-1: as many as a generation prompt may
        have, max_model_len - 1), from the left as vLLM does, so the text nearest the answer stays."""
        if keep is None:
            return token_ids
        limit = self.engine.max_model_len - 1
        if keep == 0 or keep > limit:
            raise APIError(400, f"truncate_prompt_tokens must be in [1, max_model_len - 1 = {limit}], or -1 "
                                f"for that limit; got {keep}", param="truncate_prompt_tokens")
        keep = limit if keep == -1 else keep
        return token_ids[-keep:] if len(token_ids) > keep else token_ids

    def _generation_prompts(self, items: list, truncate: int | None = None) -> list[Prompt]:
        processor, prompts = self.engine.input_processor, []
        try:
            for i, item in enumerate(items):
                prompt = self.tokenize(item, i)
                if truncate is not None:
                    prompt = dataclasses.replace(prompt, text=None, token_ids=self.truncated(prompt.token_ids, truncate),
                                                 token_type_ids=None)
                prompts.append(prompt)
                processor.check_prompt(prompts[-1].token_ids, f"prompt {i}", generation=True)
        except ValueError as err:
            raise APIError(400, str(err), param="prompt") from None
        return prompts

    def tokenize(self, item, index: int | None = None, *, add_special_tokens: bool = True) -> Prompt:
        """One prompt -> Prompt (off the loop: text is tokenized here, and counted)."""
        self.metrics.tokenized_chars.inc(text_chars(item))
        return self.engine.input_processor.prompt(item, index, add_special_tokens=add_special_tokens)

    def split(self, prompts, param: str) -> list:
        """The single prompts of a request, counted against max_prompts and max_prompt_chars
        before any is tokenized."""
        try:
            items = self.engine.input_processor.split(prompts, what=param)
        except ValueError as err:
            raise APIError(400, str(err), param=param) from None
        if len(items) > self.limits["max_prompts"]:
            raise APIError(413, f"at most {self.limits['max_prompts']} prompts per request, got {len(items)}",
                           param=param)
        check_chars(text_chars(items), self.limits["max_prompt_chars"], param)
        return items

    async def chat_prompt(self, messages, add_generation_prompt: bool = True, *, generation: bool = True,
                          chat_template: str | None = None, continue_final_message: bool = False,
                          template_kwargs: dict | None = None, truncate: int | None = None,
                          tools: list[dict] | None = None) -> Prompt:
        """The chat template's prompt for ``messages``: the character limit is checked first, then
        it is rendered and tokenized on the offload pool; with ``generation``, a prompt too long
        for the model is refused there (400). ``chat_template`` (a request's own) replaces the
        server's; ``truncate``: keep only the last that many tokens (truncate_prompt_tokens);
        ``tools``: the template's tools variable (tools.py checks the template reads it)."""
        conversation = message_dicts(messages)
        check_chars(text_chars(conversation) + text_chars(tools) + len(chat_template or ""),
                    self.limits["max_prompt_chars"], "messages")
        options = dict(chat_template=chat_template or self.chat_template,
                       continue_final_message=continue_final_message, template_kwargs=template_kwargs)
        if tools is not None:
            check_template_renders_tools(options["chat_template"] or getattr(self.engine.tokenizer, "chat_template", None))
            options["tools"] = tools
        return await self.offload.run(self._chat_prompt, conversation, add_generation_prompt, generation,
                                      options, truncate)

    def _chat_prompt(self, conversation: list[dict], add_generation_prompt: bool, generation: bool,
                     options: dict | None = None, truncate: int | None = None) -> Prompt:
        processor = self.engine.input_processor
        self.metrics.tokenized_chars.inc(text_chars(conversation))
        options = options or dict(chat_template=self.chat_template)
        try:
            # Not processor.chat: it also decodes the ids back to text, which the server never
            # uses, and a fast tokenizer's decode holds the GIL (about 0.1 s for 500k tokens).
            ids = apply_chat_template(self.engine.tokenizer, conversation, options.pop("chat_template"),
                                      add_generation_prompt, **options)
            prompt = Prompt(None, self.truncated(ids, truncate))
            if generation:
                processor.check_prompt(prompt.token_ids, "messages", generation=True)
            return prompt
        except ValueError as err:
            raise APIError(400, str(err), param="messages") from None
        except Exception as err:  # a template that fails on these messages (jinja raises its own)
            raise APIError(400, f"the chat template cannot render these messages: {type(err).__name__}",
                           param="messages") from None

    # ---- running requests ---------------------------------------------------------------------------
    async def outputs(self, handles):
        """(prompt index, delta RequestOutput) of all submitted requests, as they come."""
        ae = self.async_engine
        if len(handles) == 1:
            async for out in ae.outputs(*handles[0]):
                yield 0, out
            return
        # Bounded: a pump waits while the consumer (a client that does not read) is behind, so
        # outputs stay in the engine's per-request queues, where backpressure counts them.
        queue: asyncio.Queue = asyncio.Queue(maxsize=len(handles))

        async def pump(i, handle):
            try:
                async for out in ae.outputs(*handle):
                    await queue.put((i, out))
            except asyncio.CancelledError:   # the consumer is gone: nobody to tell
                raise
            except Exception as err:  # noqa: BLE001 (handed to the consumer)
                await queue.put((i, err))
            await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()

    async def final(self, handles) -> list:
        finals = [None] * len(handles)
        async for i, out in self.outputs(handles):
            if out.finished:
                finals[i] = out
                self.metrics.observe(out.metrics)
        return finals

    async def respond(self, requests, builder: ResponseBuilder, body, raw: Request, select=None):
        """An SSE stream when the body asks for one, else the whole response once all finish. A
        client that disconnects meanwhile cancels the work (its requests abort, freeing blocks).
        ``select``: applied to the final outputs before they are answered (best_of's ranking)."""
        handles = self.submit(requests)
        if body.stream:
            options = body.stream_options
            usage = bool(options and options.include_usage)
            continuous = bool(options and options.continuous_usage_stats)
            return self.stream_response(self.stream(requests, handles, builder, usage, continuous), handles)
        work = asyncio.ensure_future(self.final(handles))

        async def disconnected():
            while (await raw.receive())["type"] != "http.disconnect":
                pass

        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()   # its requests abort as the cancellation unwinds them
            await asyncio.gather(work, watch, return_exceptions=True)
            self.release(handles)   # a task cancelled before it ran never started reading
        if work.cancelled():
            return Response(status_code=499)   # nobody is listening any more
        if isinstance(work.exception(), EngineStepError):   # the engine loop logged it, and serves on
            raise APIError(500, str(work.exception()))
        finals = work.result() if select is None else select(work.result())
        return await self.offload.json(builder.response, finals)

    def stream_response(self, content, handles) -> StreamingResponse:
        """``content`` (server-sent events) as the response; whatever ``handles`` still run or
        wait for their reader when it ends are let go (aborted, their outputs dropped)."""
        return _ReleasingStream(content, lambda: self.release(handles))

    def release(self, handles) -> None:
        for request_id, _ in handles:
            self.async_engine.release(request_id)

    async def stream(self, requests, handles, builder: ResponseBuilder, include_usage: bool,
                     continuous_usage: bool = False):
        """The SSE events of a stream; ``continuous_usage`` (stream_options.continuous_usage_stats):
        every chunk carries the usage so far, as vLLM's do."""
        prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
        try:
            async for i, out in self.outputs(handles):
                for chunk in builder.chunks(i, out):
                    if continuous_usage:
                        chunk["usage"] = builder.usage(prompt_tokens)
                    yield sse(chunk)
                if out.finished:
                    self.metrics.observe(out.metrics)
            if include_usage:
                yield sse(builder.usage_chunk(prompt_tokens))
        except StreamBackpressureError as err:   # the client read too slowly: say so
            yield sse(APIError(503, f"{err} (--max-stream-buffer-tokens)", code="stream_buffer_full").body())
        except Exception as err:  # noqa: BLE001 (reported in the stream: the status is already sent)
            yield sse(APIError(500, f"generation failed: {type(err).__name__}").body())
        yield SSE_DONE
