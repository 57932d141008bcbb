"""The OpenAI-compatible FastAPI app over one Engine (``lepton serve``; args.py runs it).

    app = build_app(Engine("path"), served_model_name=["tiny"], api_keys=["secret"])

Routes: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings, /tokenize,
/detokenize, /health, /metrics. Requests are validated and tokenized on the event loop, then
queued on the AsyncEngine, whose thread runs the forwards; streams are server-sent events.
Every error is an OpenAI error body (errors.py); limits and keys are checked in middleware.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from ..async_engine import AsyncEngine
from ..tokenizer import apply_chat_template, encode
from .errors import APIError, install_handlers
from .metrics import ServerMetrics
from .middleware import GuardMiddleware
from .protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest,
                       TokenizeRequest, message_dicts, sampling_params)
from .responses import SSE_DONE, ResponseBuilder, sse

DEFAULT_LIMITS = dict(max_n=16, max_logprobs=20, max_stop=16, max_prompts=256, max_pending=1024)


def _generation_defaults(path: Path) -> dict:
    try:
        data = json.loads((path / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class ServerState:
    def __init__(self, engine, served_model_name, chat_template, limits: dict):
        self.engine = engine
        self.async_engine = AsyncEngine(engine) if engine.is_generative else None
        self.names = list(served_model_name or [Path(engine.model_path).name])
        self.chat_template = chat_template
        self.limits = limits
        self.defaults = _generation_defaults(Path(engine.model_path))
        self.metrics = ServerMetrics(self.async_engine)
        self.task_lock = getattr(engine, "_lock", None) or threading.RLock()

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

    def check_context(self, prompt_len: int, max_tokens: int, where: str) -> None:
        limit = self.engine.max_model_len
        if max_tokens > limit or prompt_len + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you "
                                f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the {where}, "
                                f"{max_tokens} for the completion). Please reduce the length of the "
                                f"{where} or max_tokens.", param="max_tokens")

    def check_pending(self, count: int) -> None:
        if self.async_engine.num_waiting() + count > self.limits["max_pending"]:
            raise APIError(429, f"too many requests queued (limit {self.limits['max_pending']}); retry later")

    def make_request(self, request_id: str, ids: list[int], params, text: str | None):
        try:
            return self.engine.make_request(request_id, ids, params, prompt_text=text)
        except ValueError as err:
            raise APIError(400, str(err)) from None

    def prompts(self, prompt) -> list[tuple[str | None, list[int]]]:
        """A completions prompt (string, strings, token ids, lists of token ids) -> (text, ids)."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if len(prompt) > self.limits["max_prompts"]:
            raise APIError(413, f"at most {self.limits['max_prompts']} prompts per request, got {len(prompt)}",
                           param="prompt")
        out = []
        for p in prompt:
            if isinstance(p, str):
                if self.engine.tokenizer is None:
                    raise APIError(400, "this model has no tokenizer: send token ids", param="prompt")
                out.append((p, encode(self.engine.tokenizer, p)[0]))
            else:
                out.append((None, list(p)))
        return out

    def chat_ids(self, messages, add_generation_prompt: bool = True) -> list[int]:
        try:
            return apply_chat_template(self.engine.tokenizer, message_dicts(messages), self.chat_template,
                                       add_generation_prompt)
        except ValueError as err:
            raise APIError(400, str(err), param="messages") from None
        except Exception as err:  # a template that fails on these messages (jinja raises its own)
            raise APIError(400, f"the chat template cannot render these messages: {type(err).__name__}",
                           param="messages") from None

    # ---- running requests ---------------------------------------------------------------------------
    async def outputs(self, requests):
        """(prompt index, delta RequestOutput) of all requests, as they come."""
        ae = self.async_engine
        if len(requests) == 1:
            async for out in ae.stream_prepared(requests[0]):
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, request):
            try:
                async for out in ae.stream_prepared(request):
                    queue.put_nowait((i, out))
            except BaseException as err:  # noqa: BLE001 (handed to the consumer)
                queue.put_nowait((i, err))
            finally:
                queue.put_nowait((i, None))

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
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

    async def final(self, requests) -> list:
        finals = [None] * len(requests)
        async for i, out in self.outputs(requests):
            if out.finished:
                finals[i] = out
                self.metrics.observe(out.metrics)
        return finals

    async def stream(self, requests, builder: ResponseBuilder, include_usage: bool):
        prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
        try:
            async for i, out in self.outputs(requests):
                for chunk in builder.chunks(i, out):
                    yield sse(chunk)
                if out.finished:
                    self.metrics.observe(out.metrics)
            if include_usage:
                yield sse(builder.usage_chunk(prompt_tokens))
        except Exception as err:  # noqa: BLE001 (reported in the stream: the status is already sent)
            yield sse(APIError(500, f"generation failed: {type(err).__name__}").body())
        yield SSE_DONE


def build_app(engine, *, served_model_name: list[str] | None = None, api_keys: list[str] = (),
              chat_template: str | None = None, max_body_bytes: int = 10 << 20, **limits) -> FastAPI:
    unknown = set(limits) - set(DEFAULT_LIMITS)
    if unknown:
        raise ValueError(f"unknown limits {sorted(unknown)}; known: {sorted(DEFAULT_LIMITS)}")
    st = ServerState(engine, served_model_name, chat_template, dict(DEFAULT_LIMITS, **limits))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if st.async_engine is not None:   # in-flight requests end with finish_reason "abort"
            await asyncio.get_running_loop().run_in_executor(None, st.async_engine.shutdown)

    app = FastAPI(title="lepton", version="0.1.0", lifespan=lifespan)
    app.state.lepton = st
    install_handlers(app)
    app.add_middleware(GuardMiddleware, api_keys=list(api_keys), max_body_bytes=max_body_bytes)

    @app.get("/health")
    async def health():
        ok = st.async_engine is None or st.async_engine.is_running
        return Response(status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(st.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "lepton",
                                            "max_model_len": engine.max_model_len} for name in st.names]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        model = st.check_model(body.model)
        st.generative("completions")
        prompts = st.prompts(body.prompt)
        max_tokens = body.max_tokens or 16   # OpenAI's default for completions
        params = sampling_params(body, max_tokens=max_tokens, logprobs=body.logprobs, defaults=st.defaults,
                                 limits=st.limits, stream=body.stream)
        for _, ids in prompts:
            st.check_context(len(ids), max_tokens, "prompt")
        st.check_pending(len(prompts))
        rid = f"cmpl-{uuid.uuid4().hex}"
        requests = [st.make_request(f"{rid}-{i}", ids, params, text) for i, (text, ids) in enumerate(prompts)]
        builder = ResponseBuilder("completion", rid, model, body.n, body.logprobs)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(st.stream(requests, builder, usage), media_type="text/event-stream")
        return builder.response(await st.final(requests))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        model = st.check_model(body.model)
        st.generative("chat completions")
        ids = st.chat_ids(body.messages, body.add_generation_prompt)
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, engine.max_model_len - len(ids))
        num_logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling_params(body, max_tokens=max_tokens, logprobs=num_logprobs, defaults=st.defaults,
                                 limits=st.limits, stream=body.stream)
        st.check_context(len(ids), max_tokens, "messages")
        st.check_pending(1)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        requests = [st.make_request(rid, ids, params, None)]
        builder = ResponseBuilder("chat", rid, model, body.n, num_logprobs)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(st.stream(requests, builder, usage), media_type="text/event-stream")
        return builder.response(await st.final(requests))

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        model = st.check_model(body.model)
        inputs = body.input
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        if not inputs:
            raise APIError(400, "input must not be empty", param="input")
        if len(inputs) > st.limits["max_prompts"]:
            raise APIError(413, f"at most {st.limits['max_prompts']} inputs per request", param="input")

        def run():
            with st.task_lock:
                batch = engine.preprocess(list(inputs))
                return engine.embed(batch), sum(len(ids) for ids in batch.input_ids)

        try:
            vectors, num_tokens = await asyncio.get_running_loop().run_in_executor(None, run)
        except ValueError as err:
            raise APIError(400, str(err), param="input") from None
        data = []
        for i, vec in enumerate(vectors):
            emb = (base64.b64encode(vec.float().numpy().tobytes()).decode() if body.encoding_format == "base64"
                   else vec.tolist())
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {"object": "list", "data": data, "model": model,
                "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        st.check_model(body.model)
        if engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of prompt and messages", param="prompt")
        ids = (encode(engine.tokenizer, body.prompt, body.add_special_tokens)[0] if body.prompt is not None
               else st.chat_ids(body.messages, body.add_generation_prompt))
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        st.check_model(body.model)
        if engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        bad = [t for t in body.tokens if not 0 <= t < engine.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {engine.vocab_size})",
                           param="tokens")
        return {"prompt": engine.tokenizer.decode(body.tokens)}

    return app

