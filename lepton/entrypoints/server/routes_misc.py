"""Small routes clients and platforms call besides the OpenAI ones: GET /v1/models/{id},
/version, /ping, and /tokenize (vLLM's shape, with chat messages and token strings).

/ping is /health under the name hosted inference platforms probe (SageMaker sends GET /ping;
vLLM also answers POST): 200 while the engine runs, 503 once its loop has stopped. Like /health
it needs no API key (middleware.py), since a platform's probe carries none.

``chat_tokens`` renders a conversation through the chat template and tokenizes the text with or
without the tokenizer's own special tokens; /tokenize and the chat form of /v1/embeddings share it.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import Response

import lepton
from lepton.engine.input_processor import Prompt
from lepton.entrypoints.server.errors import APIError
from lepton.entrypoints.server.offload import check_chars, text_chars
from lepton.entrypoints.server.protocol_pooling import TokenizeRequest, conversation, refuse_unsupported
from lepton.tokenizer import encode


def model_card(st, name: str) -> dict:
    """One entry of /v1/models, as GET /v1/models/{id} returns it too."""
    return {"id": name, "object": "model", "created": 0, "owned_by": "lepton",
            "max_model_len": st.engine.max_model_len}


async def chat_tokens(st, messages, *, add_generation_prompt: bool, add_special_tokens: bool,
                      param: str = "messages") -> Prompt:
    """The template's text of ``messages`` and its tokens (limits checked on the loop first, the
    work done on the offload pool). A template that cannot render them is the client's 400."""
    conv = conversation(messages, param)
    check_chars(text_chars(conv), st.limits["max_prompt_chars"], param)
    tokenizer = st.engine.tokenizer
    if tokenizer is None:
        raise APIError(400, "this model has no tokenizer", param=param)

    def render() -> Prompt:
        st.metrics.tokenized_chars.inc(text_chars(conv))
        template = st.chat_template
        if template is None and not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template and the server was started "
                                "without --chat-template", param=param)
        try:
            text = tokenizer.apply_chat_template(conv, chat_template=template, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        except Exception as err:  # jinja raises its own types for a template that fails on these messages
            raise APIError(400, f"the chat template cannot render these messages: {type(err).__name__}",
                           param=param) from None
        ids, types = encode(tokenizer, text, add_special_tokens)
        return Prompt(text, ids, types)

    return await st.offload.run(render)


def register_misc_routes(app: FastAPI, st) -> None:
    engine = st.engine

    @app.get("/v1/models/{model_id:path}")   # :path, since hub-style names hold a slash
    async def retrieve_model(model_id: str):
        if model_id not in st.names:
            raise APIError(404, f"The model `{model_id}` does not exist; this server serves "
                                f"{', '.join(st.names)}", param="model", code="model_not_found")
        return model_card(st, model_id)

    @app.get("/version")
    async def version():
        return {"version": lepton.__version__}

    @app.api_route("/ping", methods=["GET", "POST", "HEAD"])
    async def ping():
        ok = st.async_engine is None or st.async_engine.is_running
        return Response(status_code=200 if ok else 503)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        st.check_model(body.model)
        refuse_unsupported(body, TokenizeRequest.UNSUPPORTED)
        if engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of prompt and messages", param="prompt")
        if body.prompt is not None:
            check_chars(len(body.prompt), st.limits["max_prompt_chars"], "prompt")
            special = True if body.add_special_tokens is None else body.add_special_tokens
            prompt = await st.offload.run(st.tokenize, body.prompt, add_special_tokens=special)
        else:   # no length check: /tokenize tells how long a prompt is, even one too long to run
            prompt = await chat_tokens(st, body.messages, add_generation_prompt=body.add_generation_prompt,
                                       add_special_tokens=bool(body.add_special_tokens))
        ids = prompt.token_ids

        def answer() -> dict:
            out = {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}
            if body.return_token_strs:   # vLLM's token_strs: the vocabulary's own pieces ("Ġfox", "##ly")
                out["token_strs"] = engine.tokenizer.convert_ids_to_tokens(ids)
            return out

        return await st.offload.json(answer)
