"""Per-server state and the request plumbing shared by the routes of api_server.py: model and
limit checks, tokenization, and running requests on the AsyncEngine (streamed or whole)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from lepton.engine.async_engine import AsyncEngine
from lepton.engine.input_processor import Prompt
from lepton.entrypoints.server.errors import APIError
from lepton.entrypoints.server.metrics import ServerMetrics
from lepton.entrypoints.server.protocol import message_dicts
from lepton.entrypoints.server.responses import SSE_DONE, ResponseBuilder, sse
from lepton.model_executor.config_checks import read_generation_config

DEFAULT_LIMITS = dict(max_n=16, max_logprobs=20, max_stop=16, max_prompts=256, max_pending=1024)


def _generation_defaults(path: Path) -> dict:
    # Checked when the engine loaded (a bad default fails at startup, not on every request).
    return read_generation_config(path)


class ServerState:
    def __init__(self, engine, served_model_name, chat_template, limits: dict):
        self.engine = engine
        self.async_engine = AsyncEngine(engine) if engine.is_generative else None
        self.names = list(served_model_name or [Path(engine.model_path).name])
        self.chat_template = chat_template
        self.limits = limits
        self.defaults = _generation_defaults(Path(engine.model_path))
        self.metrics = ServerMetrics(self.async_engine)

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
        if self.async_engine.num_waiting() + len(requests) > self.limits["max_pending"]:
            raise APIError(429, f"too many requests queued (limit {self.limits['max_pending']}); retry later")
        try:
            return [(r.request_id, self.async_engine.submit(r)) for r in requests]
        except ValueError as err:
            raise APIError(400, str(err)) from None

    def make_request(self, request_id: str, prompt: Prompt, params, label: str):
        """The engine's input processor validates; its ValueError is the client's 400."""
        try:
            return self.engine.input_processor.process(request_id, prompt, params, label=label)
        except ValueError as err:
            raise APIError(400, str(err)) from None

    def prompts(self, prompt) -> list[Prompt]:
        """A completions prompt (string, strings, token ids, lists of token ids) -> Prompts; the
        count limit is checked before anything is tokenized."""
        items = self.split(prompt, "prompt")
        try:
            return [self.engine.input_processor.prompt(p, i) for i, p in enumerate(items)]
        except ValueError as err:
            raise APIError(400, str(err), param="prompt") from None

    def split(self, prompts, param: str) -> list:
        """The single prompts of a request, counted against max_prompts before any is tokenized."""
        try:
            items = self.engine.input_processor.split(prompts, what=param)
        except ValueError as err:
            raise APIError(400, str(err), param=param) from None
        if len(items) > self.limits["max_prompts"]:
            raise APIError(413, f"at most {self.limits['max_prompts']} prompts per request, got {len(items)}",
                           param=param)
        return items

    def chat_prompt(self, messages, add_generation_prompt: bool = True) -> Prompt:
        try:
            return self.engine.input_processor.chat(message_dicts(messages), self.chat_template,
                                                    add_generation_prompt)[0]
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
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, handle):
            try:
                async for out in ae.outputs(*handle):
                    queue.put_nowait((i, out))
            except BaseException as err:  # noqa: BLE001 (handed to the consumer)
                queue.put_nowait((i, err))
            finally:
                queue.put_nowait((i, None))

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

    async def respond(self, requests, builder: ResponseBuilder, body, raw: Request):
        """An SSE stream when the body asks for one, else the whole response once all finish. A
        client that disconnects meanwhile cancels the work (its requests abort, freeing blocks)."""
        handles = self.submit(requests)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self.stream(requests, handles, builder, usage), media_type="text/event-stream")
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
        if work.cancelled():
            return Response(status_code=499)   # nobody is listening any more
        return builder.response(work.result())

    async def stream(self, requests, handles, builder: ResponseBuilder, include_usage: bool):
        prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
        try:
            async for i, out in self.outputs(handles):
                for chunk in builder.chunks(i, out):
                    yield sse(chunk)
                if out.finished:
                    self.metrics.observe(out.metrics)
            if include_usage:
                yield sse(builder.usage_chunk(prompt_tokens))
        except Exception as err:  # noqa: BLE001 (reported in the stream: the status is already sent)
            yield sse(APIError(500, f"generation failed: {type(err).__name__}").body())
        yield SSE_DONE
