"""The routes of models that pool rather than generate (vLLM's shapes):

  /v1/embeddings   ``input`` texts or token ids, or chat ``messages`` rendered by the template
                   (vLLM's embeddings chat request); ``dimensions`` cuts a Matryoshka model's
                   vectors to their first k features and, for a model whose vectors are unit
                   length, renormalises them (matryoshka.py); any other model refuses it (400);
                   ``encoding_format`` float or base64 (little-endian float32)
  /v1/score        text_1 against text_2 (one to one, one to many, or zipped lists)
  /v1/rerank       documents against a query, best first, ``top_n`` of them
  /classify        a sequence-classification head's label and probabilities per input

A cross-encoder (a classification head with one output) scores a pair read together, encoded as
the tokenizer encodes a pair ([CLS] a [SEP] b [SEP], b's token types 1), with the activation its
sentence-transformers config names (sigmoid by default, as CrossEncoder applies); any other model
scores a pair by the cosine similarity of the two texts' embeddings. Forwards run on a worker
thread, between the engine's steps, as /v1/embeddings always did.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid

import torch
import torch.nn.functional as F
from fastapi import FastAPI
from fastapi.responses import Response

from lepton.engine.input_processor import Prompt
from lepton.engine.tasks import Batch
from lepton.entrypoints.server.errors import APIError
from lepton.entrypoints.server.json_codec import dumps
from lepton.entrypoints.server.offload import check_chars, text_chars
from lepton.entrypoints.server.protocol_pooling import (ClassifyRequest, EmbeddingsRequest, RerankRequest,
                                                         ScoreRequest, refuse_unsupported)
from lepton.entrypoints.server.routes_misc import chat_tokens
from lepton.model_executor.matryoshka import check_dimensions, read_matryoshka

# Activations sentence-transformers' CrossEncoder names in config.json, by class name.
_ACTIVATIONS = {"Sigmoid": torch.sigmoid, "Identity": lambda x: x, "Tanh": torch.tanh}


def cross_encoder_activation(hf_config: dict):
    """config.json's ``sentence_transformers.activation_fn`` (or the pre-v4 key), else sigmoid,
    CrossEncoder's default for one output; None for an activation lepton does not know."""
    path = (hf_config.get("sentence_transformers") or {}).get("activation_fn") \
        or hf_config.get("sbert_ce_default_activation_function") or "torch.nn.Sigmoid"
    return _ACTIVATIONS.get(str(path).rsplit(".", 1)[-1])


def _embedding_size(engine) -> int | None:
    """The size of the model's embeddings, when its config tells (pooled modes x hidden size)."""
    hidden = engine.hf_config.get("hidden_size") or engine.hf_config.get("n_embd")
    pooler = engine.tasks.pooler
    return int(hidden) * len(pooler.modes) if hidden and pooler is not None else None


def truncated_prompt(engine, item, keep: int, add_special_tokens: bool) -> Prompt:
    """truncate_prompt_tokens on an embeddings input: a text through the tokenizer's own
    truncation (its special tokens kept, the text cut), token ids cut to their first ``keep``."""
    if not isinstance(item, str):
        prompt = engine.input_processor.prompt(item)
        return Prompt(None, prompt.token_ids[:keep])
    enc = engine.tokenizer(item, truncation=True, max_length=keep, add_special_tokens=add_special_tokens)
    types = list(enc["token_type_ids"]) if "token_type_ids" in enc else None
    return Prompt(item, list(enc["input_ids"]), types)


def _usage(num_tokens: int) -> dict:
    return {"prompt_tokens": num_tokens, "total_tokens": num_tokens, "completion_tokens": 0}


def _pairs(text_1, text_2) -> list[tuple[str, str]]:
    first = [text_1] if isinstance(text_1, str) else list(text_1)
    second = [text_2] if isinstance(text_2, str) else list(text_2)
    if not first:
        raise APIError(400, "text_1 must not be empty", param="text_1")
    if not second:
        raise APIError(400, "text_2 must not be empty", param="text_2")
    if len(first) == 1:
        first = first * len(second)
    elif len(first) != len(second):
        raise APIError(400, f"text_1 has {len(first)} texts and text_2 {len(second)}: send one text_1, "
                            f"or as many as text_2 (they are paired in order)", param="text_2")
    return list(zip(first, second))


def register_pooling_routes(app: FastAPI, st) -> None:
    engine = st.engine
    model_obj = engine.model
    head = getattr(model_obj, "id2label", None) if hasattr(model_obj, "classify") else None
    matryoshka = read_matryoshka(engine.model_path, engine.hf_config)   # a malformed one fails at startup
    size = _embedding_size(engine)

    async def off_loop(run, param: str) -> Response:
        """``run()`` on a worker thread; its ValueError (a bad input) is the client's 400."""
        try:   # the JSON too: a batch of long vectors is a large answer to encode
            body = await asyncio.get_running_loop().run_in_executor(None, lambda: dumps(run()).encode())
        except ValueError as err:
            raise APIError(400, str(err), param=param) from None
        return Response(body, media_type="application/json")

    def check_pairs(pairs: list, param: str) -> None:
        if len(pairs) > st.limits["max_prompts"]:
            raise APIError(413, f"at most {st.limits['max_prompts']} pairs per request, got {len(pairs)}",
                           param=param)
        check_chars(text_chars(pairs), st.limits["max_prompt_chars"], param)

    def scores(pairs: list[tuple[str, str]], params: tuple[str, str]) -> tuple[list[float], int]:
        """(score per pair, tokens run); on a worker thread. ``params`` name the two sides."""
        st.metrics.tokenized_chars.inc(text_chars(pairs))
        if head is None:   # a bi-encoder: the cosine similarity of the two embeddings
            rows, num_tokens = [], 0
            for side, param in enumerate(params):
                texts = list(dict.fromkeys(pair[side] for pair in pairs))   # each text once
                try:   # a text too long for the model is named by its side
                    batch = engine.preprocess(texts)
                except ValueError as err:
                    raise APIError(400, str(err), param=param) from None
                vectors = F.normalize(engine.embed(batch).double(), dim=-1)
                rows.append({text: vectors[i] for i, text in enumerate(texts)})
                num_tokens += sum(len(ids) for ids in batch.input_ids)
            return [float(rows[0][a] @ rows[1][b]) for a, b in pairs], num_tokens
        if len(head) != 1:
            raise APIError(400, f"scoring needs a cross-encoder with one output; this model classifies into "
                                f"{len(head)} labels (use /classify)", param="model")
        activation = cross_encoder_activation(engine.hf_config)
        if activation is None:
            raise APIError(400, "this cross-encoder's activation_fn (config.json) is not one lepton knows "
                                f"({', '.join(_ACTIVATIONS)})", param="model")
        ids, types = [], []
        for i, (a, b) in enumerate(pairs):
            enc = engine.tokenizer(a, b)   # the tokenizer's pair encoding: [CLS] a [SEP] b [SEP]
            ids.append(list(enc["input_ids"]))
            types.append(list(enc["token_type_ids"]) if "token_type_ids" in enc else [0] * len(ids[-1]))
            engine.input_processor.check_prompt(ids[-1], f"pair {i}", generation=False)
        logits = engine.forward(Batch(ids, types, [None] * len(ids)))["logits"][:, 0]
        return activation(logits.double()).tolist(), sum(map(len, ids))

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingsRequest):
        model = st.check_model(body.model)
        refuse_unsupported(body, EmbeddingsRequest.UNSUPPORTED)
        if body.dimensions is not None:   # refused before any work when the model cannot honour it
            try:
                check_dimensions(body.dimensions, size or body.dimensions, matryoshka, model)
            except ValueError as err:
                raise APIError(400, str(err), param="dimensions") from None
        if (body.input is None) == (body.messages is None):
            raise APIError(400, "send exactly one of input and messages", param="input")
        if body.messages is not None:
            special = bool(body.add_special_tokens)   # vLLM's default for chat: the template's only
            inputs = [await chat_tokens(st, body.messages, add_generation_prompt=body.add_generation_prompt,
                                        add_special_tokens=special)]
        else:
            inputs = st.split(body.input, "input")

        keep = body.truncate_prompt_tokens
        if keep is not None and not (keep == -1 or 1 <= keep <= engine.max_model_len):
            raise APIError(400, f"truncate_prompt_tokens must be in [1, max_model_len = {engine.max_model_len}] "
                                f"or -1 for that limit; got {keep}", param="truncate_prompt_tokens")
        keep = engine.max_model_len if keep == -1 else keep

        def run() -> dict:
            prompts = inputs
            if body.messages is None:   # vLLM's default for input: the tokenizer's special tokens too
                st.metrics.tokenized_chars.inc(text_chars(inputs))
                special = body.add_special_tokens is not False
                prompts = [truncated_prompt(engine, item, keep, special) if keep is not None
                           else engine.input_processor.prompt(item, i, add_special_tokens=special)
                           for i, item in enumerate(inputs)]
            elif keep is not None:
                prompts = [Prompt(None, p.token_ids[:keep], None if p.token_type_ids is None else p.token_type_ids[:keep])
                           for p in prompts]
            batch = engine.preprocess(list(prompts))
            vectors = engine.embed(batch)
            if body.dimensions is not None:
                try:   # again with the size the vectors have (the config may not have told)
                    check_dimensions(body.dimensions, vectors.shape[1], matryoshka, model)
                except ValueError as err:
                    raise APIError(400, str(err), param="dimensions") from None
                vectors = vectors[:, :body.dimensions]
                if engine.tasks.pooler is not None and engine.tasks.pooler.normalize:
                    # The full vectors are unit length; their prefixes are made so again.
                    vectors = F.normalize(vectors.double(), dim=-1).float()
            data = []
            for i, vec in enumerate(vectors):
                emb = (base64.b64encode(vec.float().numpy().astype("<f4").tobytes()).decode()
                       if body.encoding_format == "base64" else vec.tolist())
                data.append({"object": "embedding", "index": i, "embedding": emb})
            num_tokens = sum(len(ids) for ids in batch.input_ids)
            return {"id": f"embd-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                    "data": data, "model": model, "usage": _usage(num_tokens)}

        return await off_loop(run, "messages" if body.messages is not None else "input")

    @app.post("/v1/score")
    @app.post("/score")
    async def score(body: ScoreRequest):
        model = st.check_model(body.model)
        refuse_unsupported(body, ScoreRequest.UNSUPPORTED)
        pairs = _pairs(body.text_1, body.text_2)
        check_pairs(pairs, "text_2")

        def run() -> dict:
            values, num_tokens = scores(pairs, ("text_1", "text_2"))
            data = [{"index": i, "object": "score", "score": v} for i, v in enumerate(values)]
            return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                    "model": model, "data": data, "usage": _usage(num_tokens)}

        return await off_loop(run, "text_2")

    @app.post("/v1/rerank")
    @app.post("/rerank")
    @app.post("/v2/rerank")
    async def rerank(body: RerankRequest):
        model = st.check_model(body.model)
        refuse_unsupported(body, RerankRequest.UNSUPPORTED)
        pairs = [(body.query, doc) for doc in body.documents]
        check_pairs(pairs, "documents")

        def run() -> dict:
            values, num_tokens = scores(pairs, ("query", "documents"))
            order = sorted(range(len(values)), key=lambda i: -values[i])   # stable: ties keep input order
            if body.top_n:
                order = order[:body.top_n]
            results = [{"index": i, "relevance_score": values[i],
                        "document": {"text": body.documents[i]} if body.return_documents else None}
                       for i in order]
            return {"id": f"rerank-{uuid.uuid4().hex}", "model": model, "results": results,
                    "usage": _usage(num_tokens)}

        return await off_loop(run, "documents")

    @app.post("/classify")
    async def classify(body: ClassifyRequest):
        model = st.check_model(body.model)
        refuse_unsupported(body, ClassifyRequest.UNSUPPORTED)
        if head is None:
            raise APIError(400, f"{model} has no sequence-classification head (e.g. "
                                "BertForSequenceClassification), so it cannot classify", param="model")
        inputs = st.split(body.input, "input")

        def run() -> dict:
            st.metrics.tokenized_chars.inc(text_chars(inputs))
            batch = engine.preprocess(list(inputs))
            logits = engine.forward(batch)["logits"].double()
            # One output is a score, not a distribution (softmax of it is always 1): sigmoid.
            probs = torch.sigmoid(logits) if logits.shape[1] == 1 else logits.softmax(dim=-1)
            data = [{"index": i, "label": head[int(row.argmax())], "probs": row.tolist(),
                     "num_classes": len(head)} for i, row in enumerate(probs)]
            return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                    "model": model, "data": data,
                    "usage": _usage(sum(len(ids) for ids in batch.input_ids))}

        return await off_loop(run, "input")
