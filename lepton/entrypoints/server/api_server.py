"""The OpenAI-compatible FastAPI app over one Engine (``lepton serve``; args.py runs it).

    app = build_app(Engine("path"), served_model_name=["tiny"], api_keys=["secret"])

Routes: /v1/models, /v1/completions, /v1/chat/completions, /detokenize, /health, /metrics here;
the pooling routes (/v1/embeddings, /v1/score, /v1/rerank, /classify), /v1/responses, and
/tokenize, /ping, /version, /v1/models/{id} in routes_*.py. Requests are checked on the event
loop (sizes first), tokenized and templated on a small thread pool (offload.py), then queued on
the AsyncEngine, whose thread runs the forwards; streams are server-sent events. Large JSON
answers are encoded on the pool too.
Every error is an OpenAI error body (errors.py); limits and keys are checked in middleware.py;
on shutdown, what is still in flight ends cleanly (drain.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import contextlib
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import Response

from lepton.entrypoints.server.drain import Drain, DrainMiddleware
from lepton.entrypoints.server.errors import APIError, install_handlers
from lepton.entrypoints.server.json_codec import JSONRoute
from lepton.entrypoints.server.middleware import GuardMiddleware
from lepton.entrypoints.server.offload import decode
from lepton.entrypoints.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                       best_n, check_best_of, logprob_options, message_dicts, sampling_params)
from lepton.entrypoints.server.responses import ResponseBuilder
from lepton.entrypoints.server.routes_misc import register_misc_routes
from lepton.entrypoints.server.routes_pooling import register_pooling_routes
from lepton.entrypoints.server.routes_responses import register_responses_routes
from lepton.entrypoints.server.state import DEFAULT_LIMITS, ServerState
from lepton.entrypoints.server.tool_calls import PARSERS
from lepton.entrypoints.server.tools import plan_tools

def build_app(engine, *, served_model_name: list[str] | None = None, api_keys: list[str] = (),
              chat_template: str | None = None, max_body_bytes: int = 10 << 20, metrics_public: bool = False,
              cache_salt_by_api_key: bool = False, body_timeout: float | None = None,
              tool_call_parser: str | None = None, **limits) -> FastAPI:
    """``metrics_public``: /metrics needs no key even with ``api_keys``; ``cache_salt_by_api_key``:
    each key gets its own prefix-cache partition; ``body_timeout``: seconds a body may take to
    arrive (408 past it); ``tool_call_parser``: reads tool calls for tool_choice "auto" (tools.py).
    ``app.state.drain`` is the Drain a server starts on SIGTERM (drain.py)."""
    unknown = set(limits) - set(DEFAULT_LIMITS)
    if unknown:
        raise ValueError(f"unknown limits {sorted(unknown)}; known: {sorted(DEFAULT_LIMITS)}")
    if cache_salt_by_api_key and not api_keys:
        raise ValueError("--cache-salt-by-api-key needs --api-key: without keys there is nothing to salt by")
    st = ServerState(engine, served_model_name, chat_template, dict(DEFAULT_LIMITS, **limits))
    st.cache_salt_by_api_key = cache_salt_by_api_key
    if tool_call_parser is not None and tool_call_parser not in PARSERS:
        raise ValueError(f"unknown tool-call parser {tool_call_parser!r}; known: {', '.join(sorted(PARSERS))}")
    st.tool_call_parser = tool_call_parser

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        st.offload.shutdown()   # queued tokenizing is dropped: nobody waits for it any more
        if st.async_engine is not None:   # in-flight requests end with finish_reason "abort"
            await asyncio.get_running_loop().run_in_executor(None, st.async_engine.shutdown)
            # Tensor parallel: the worker ranks end here, with the app (uvicorn re-raises SIGTERM
            # once the app is down: nothing after server.run() would run).
            await asyncio.get_running_loop().run_in_executor(None, st.async_engine.engine.shutdown)

    app = FastAPI(title="lepton", version="0.1.0", lifespan=lifespan)
    app.router.route_class = JSONRoute   # large bodies parsed in short hold of the GIL
    app.state.lepton = st
    install_handlers(app)
    app.add_middleware(GuardMiddleware, api_keys=list(api_keys), max_body_bytes=max_body_bytes,
                       metrics_public=metrics_public, body_timeout=body_timeout)
    app.state.drain = Drain()
    app.add_middleware(DrainMiddleware, drain=app.state.drain)   # added last: the outermost

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
        body.refuse_unsupported()
        best_of = check_best_of(body)
        prompt_logprobs = logprob_options(body, st.limits)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens   # OpenAI's default for completions
        if max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens 0 needs echo: true (the prompt alone, scored)", param="max_tokens")
        # limits checked, then tokenized (and truncated, with truncate_prompt_tokens) off the loop
        prompts = await st.prompts(body.prompt, body.truncate_prompt_tokens)
        # max_tokens 0: the engine samples one token in the prompt's forward; the response drops it.
        params = sampling_params(body, max_tokens=max(1, max_tokens), logprobs=body.logprobs, defaults=st.defaults,
                                 limits=st.limits, stream=body.stream,
                                 vocab_size=engine.vocab_size)
        params = dataclasses.replace(params, prompt_logprobs=prompt_logprobs)
        if best_of > body.n:   # best_of samples, ranked by their cumulative logprob (needs logprobs)
            params = dataclasses.replace(params, n=best_of, logprobs=params.logprobs or 0)
        rid = f"cmpl-{uuid.uuid4().hex}"
        salt = st.cache_salt(body, raw)
        requests = [st.make_request(f"{rid}-{i}", prompt, params, f"prompt {i}", salt, priority=body.priority)
                    for i, prompt in enumerate(prompts)]
        builder = ResponseBuilder("completion", rid, model, body.n, body.logprobs, engine.tokenizer, echo=body.echo,
                                  prompt_logprobs=body.prompt_logprobs, generate=max_tokens > 0,
                                  skip_special_tokens=body.skip_special_tokens, return_token_ids=body.return_token_ids,
                                  tokens_as_ids=body.return_tokens_as_token_ids)
        select = (lambda finals: [best_n(out, body.n, body.logprobs is not None) for out in finals]) \
            if best_of > body.n else None
        return await st.respond(requests, builder, body, raw, select=select)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        model = st.check_model(body.model)
        st.generative("chat completions")
        body.refuse_unsupported()
        tools = plan_tools(body, st.tool_call_parser)
        prompt = await st.chat_prompt(body.messages, body.add_generation_prompt,
                                      chat_template=body.chat_template,
                                      continue_final_message=body.continue_final_message,
                                      template_kwargs=body.chat_template_kwargs,
                                      truncate=body.truncate_prompt_tokens, tools=tools.tools)
        max_tokens = (body.max_completion_tokens or body.max_tokens
                      or max(1, engine.max_model_len - len(prompt.token_ids)))
        num_logprobs = (body.top_logprobs or 0) if body.logprobs else None
        prompt_logprobs = logprob_options(body, st.limits)
        params = sampling_params(body, max_tokens=max_tokens, logprobs=num_logprobs, defaults=st.defaults,
                                 limits=st.limits, stream=body.stream,
                                 vocab_size=engine.vocab_size)
        params = dataclasses.replace(params, prompt_logprobs=prompt_logprobs,
                                     structured_outputs=tools.structured or params.structured_outputs,
                                     skip_special_tokens=params.skip_special_tokens and tools.skip_special_tokens)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        requests = [st.make_request(rid, dataclasses.replace(prompt, text=None), params, "messages",
                                    st.cache_salt(body, raw), priority=body.priority)]
        # chat echo (vLLM's): the answer repeats the last message when it is the assistant's own
        last = message_dicts(body.messages[-1:])[0]
        echo = last["content"] if body.echo and last["role"] == "assistant" else ""
        if echo and tools.mode != "none":
            raise APIError(400, "echo cannot be combined with tool calls", param="echo")
        builder = ResponseBuilder("chat", rid, model, body.n, num_logprobs, engine.tokenizer,
                                  prompt_logprobs=body.prompt_logprobs, return_token_ids=body.return_token_ids,
                                  tokens_as_ids=body.return_tokens_as_token_ids, chat_echo=echo,
                                  tool_calls=tools.shaper())
        return await st.respond(requests, builder, body, raw)

    # /v1/embeddings, /v1/score, /v1/rerank, /classify: routes_pooling.py; /tokenize, /ping,
    # /version, /v1/models/{id}: routes_misc.py; /v1/responses: routes_responses.py.
    register_pooling_routes(app, st)
    register_misc_routes(app, st)
    register_responses_routes(app, st)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        st.check_model(body.model)
        if engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")

        def run():   # off the loop: the check and the decode are linear in the (body-sized) list
            tokens = body.tokens
            if tokens and (min(tokens) < 0 or max(tokens) >= engine.vocab_size):   # loops in C
                bad = next(t for t in tokens if not 0 <= t < engine.vocab_size)
                raise APIError(400, f"token id {bad} is outside the vocabulary [0, {engine.vocab_size})",
                               param="tokens")
            return {"prompt": decode(engine.tokenizer, body.tokens)}

        return await st.offload.json(run)

    return app

