"""The OpenAI-compatible FastAPI app over one Engine (``lepton serve``; args.py runs it).

    app = build_app(Engine("path"), served_model_name=["tiny"], api_keys=["secret"])

Routes: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings, /tokenize,
/detokenize, /health, /metrics. Requests are validated and tokenized on the event loop, then
queued on the AsyncEngine, whose thread runs the forwards; streams are server-sent events.
Every error is an OpenAI error body (errors.py); limits and keys are checked in middleware.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import base64
import contextlib
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import Response

from lepton.entrypoints.server.errors import APIError, install_handlers
from lepton.entrypoints.server.middleware import GuardMiddleware
from lepton.entrypoints.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest,
                       TokenizeRequest, sampling_params)
from lepton.entrypoints.server.responses import ResponseBuilder
from lepton.entrypoints.server.state import DEFAULT_LIMITS, ServerState

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

    @app.api_route("/health", methods=["GET", "HEAD"])   # HEAD: probes that skip the body
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
    async def completions(body: CompletionRequest, raw: Request):
        model = st.check_model(body.model)
        st.generative("completions")
        prompts = st.prompts(body.prompt)
        max_tokens = body.max_tokens or 16   # OpenAI's default for completions
        params = sampling_params(body, max_tokens=max_tokens, logprobs=body.logprobs, defaults=st.defaults,
                                 limits=st.limits, stream=body.stream)
        rid = f"cmpl-{uuid.uuid4().hex}"
        requests = [st.make_request(f"{rid}-{i}", prompt, params, f"prompt {i}")
                    for i, prompt in enumerate(prompts)]
        return await st.respond(requests, ResponseBuilder("completion", rid, model, body.n, body.logprobs),
                                body, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        model = st.check_model(body.model)
        st.generative("chat completions")
        prompt = st.chat_prompt(body.messages, body.add_generation_prompt)
        max_tokens = (body.max_completion_tokens or body.max_tokens
                      or max(1, engine.max_model_len - len(prompt.token_ids)))
        num_logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling_params(body, max_tokens=max_tokens, logprobs=num_logprobs, defaults=st.defaults,
                                 limits=st.limits, stream=body.stream)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        requests = [st.make_request(rid, dataclasses.replace(prompt, text=None), params, "messages")]
        return await st.respond(requests, ResponseBuilder("chat", rid, model, body.n, num_logprobs,
                                                                 engine.tokenizer), body, raw)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        model = st.check_model(body.model)
        inputs = st.split(body.input, "input")

        def run():
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
        prompt = (engine.input_processor.prompt(body.prompt, add_special_tokens=body.add_special_tokens)
                  if body.prompt is not None else st.chat_prompt(body.messages, body.add_generation_prompt))
        ids = prompt.token_ids
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

