"""POST /v1/responses: OpenAI's Responses API over a chat model (fields: protocol_responses.py).

The input (after ``instructions`` as a system message) goes through the chat template, as
/v1/chat/completions does, and one completion is generated. The answer is a response object
whose ``output`` holds one assistant message with one ``output_text`` part; ``output_text`` (the
SDKs' convenience) is in the JSON too. A completion cut by ``max_output_tokens`` (or by the
context) makes the response ``incomplete`` with reason ``max_output_tokens``.

Streamed, the events are the Responses API's semantic events, each ``event: <type>`` with its
JSON, numbered by ``sequence_number``:
    response.created, response.in_progress          (the response, in progress, no output yet)
    response.output_item.added, response.content_part.added
    response.output_text.delta                      (one per piece of text)
    response.output_text.done, response.content_part.done, response.output_item.done
    response.completed | response.incomplete        (the whole response, with usage)
A failure after the stream has started is an ``error`` event, then ``response.failed``.
"""

from __future__ import annotations

import dataclasses
import time
import uuid

from fastapi import FastAPI, Request

from lepton.engine.async_engine import StreamBackpressureError
from lepton.entrypoints.server.errors import APIError
from lepton.entrypoints.server.protocol import ChatMessage
from lepton.entrypoints.server.protocol_responses import ResponsesRequest, check_supported, input_messages
from lepton.entrypoints.server.responses import event_json
from lepton.sampling_params import RequestOutputKind, SamplingParams


def sampling(body: ResponsesRequest, defaults: dict, room: int) -> SamplingParams:
    """Unset temperature / top_p take generation_config.json's values, then OpenAI's (1.0); the
    other sampling knobs the Responses API has no field for take the checkpoint's, as chat does."""
    kwargs = {name: defaults[name] for name in ("top_k", "min_p", "repetition_penalty")
              if defaults.get(name) is not None}
    if kwargs.get("top_k") == 0:
        kwargs["top_k"] = -1     # 0 means "off" in HF's generation_config
    temperature = body.temperature if body.temperature is not None else defaults.get("temperature", 1.0)
    top_p = body.top_p if body.top_p is not None else defaults.get("top_p", 1.0)
    kind = RequestOutputKind.DELTA if body.stream else RequestOutputKind.FINAL_ONLY
    try:
        return SamplingParams(n=1, temperature=temperature, top_p=top_p, output_kind=kind,
                              max_tokens=body.max_output_tokens or max(1, room), **kwargs)
    except ValueError as err:
        message = str(err)
        raise APIError(400, message, param=message.split(" ", 1)[0]) from None


class ResponseView:
    """The response object of one request, whole or as stream events."""

    def __init__(self, response_id: str, model: str, body: ResponsesRequest, params: SamplingParams):
        self.id, self.model, self.body, self.params = response_id, model, body, params
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.sequence = 0

    def message(self, text: str, status: str) -> dict:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": [part] if status != "in_progress" else []}

    def snapshot(self, status: str, out=None, text: str = "", output_tokens: int = 0) -> dict:
        """The response object; ``out`` (the final RequestOutput) gives the usage."""
        b = self.body
        obj = {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
               "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
               "error": None, "incomplete_details": None, "instructions": b.instructions,
               "max_output_tokens": b.max_output_tokens, "model": self.model, "output": [],
               "parallel_tool_calls": True if b.parallel_tool_calls is None else b.parallel_tool_calls,
               "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
               "store": False, "background": False, "service_tier": "default",
               "temperature": self.params.temperature, "top_p": self.params.top_p,
               "text": {"format": {"type": "text"}}, "tool_choice": b.tool_choice or "auto", "tools": [],
               "truncation": "disabled", "top_logprobs": 0, "user": b.user, "metadata": b.metadata or {},
               "safety_identifier": b.safety_identifier, "prompt_cache_key": b.prompt_cache_key,
               "usage": None, "output_text": text}
        if status == "incomplete":
            obj["incomplete_details"] = {"reason": "max_output_tokens"}
        if status != "in_progress":
            obj["output"] = [self.message(text, "completed" if status == "completed" else "incomplete")]
        if out is not None:
            prompt_tokens = len(out.prompt_token_ids)
            obj["usage"] = {"input_tokens": prompt_tokens,
                            "input_tokens_details": {"cached_tokens": out.num_cached_tokens or 0},
                            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                            "total_tokens": prompt_tokens + output_tokens}
        return obj

    @staticmethod
    def status(finish_reason: str | None) -> str:
        return {"stop": "completed", "length": "incomplete"}.get(finish_reason, "failed")

    def response(self, outputs: list) -> dict:
        """The whole response (st.respond calls it with the final outputs)."""
        out = outputs[0]
        c = out.outputs[0]
        return self.snapshot(self.status(c.finish_reason), out, c.text, len(c.token_ids))

    # ---- streaming -------------------------------------------------------------------------------
    def event(self, kind: str, **fields) -> str:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {event_json(payload)}\n\n"

    async def events(self, st, handles):
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        yield self.event("response.created", response=self.snapshot("in_progress"))
        yield self.event("response.in_progress", response=self.snapshot("in_progress"))
        yield self.event("response.output_item.added", output_index=0, item=self.message("", "in_progress"))
        yield self.event("response.content_part.added", **where,
                         part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        pieces, output_tokens, final = [], 0, None
        try:
            async for _, out in st.outputs(handles):
                c = out.outputs[0]
                output_tokens += len(c.token_ids)
                if c.text:
                    pieces.append(c.text)
                    yield self.event("response.output_text.delta", **where, delta=c.text, logprobs=[])
                if out.finished:
                    final = out
                    st.metrics.observe(out.metrics)
        except StreamBackpressureError as err:   # the client read too slowly: say so
            yield self.failure("stream_buffer_full", f"{err} (--max-stream-buffer-tokens)", "".join(pieces))
            return
        except Exception as err:  # noqa: BLE001 (reported in the stream: the status is already sent)
            yield self.failure("server_error", f"generation failed: {type(err).__name__}", "".join(pieces))
            return
        text = "".join(pieces)
        status = self.status(final.outputs[0].finish_reason)
        item = self.message(text, "completed" if status == "completed" else "incomplete")
        yield self.event("response.output_text.done", **where, text=text, logprobs=[])
        yield self.event("response.content_part.done", **where, part=item["content"][0])
        yield self.event("response.output_item.done", output_index=0, item=item)
        done = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(status, "response.failed")
        yield self.event(done, response=self.snapshot(status, final, text, output_tokens))

    def failure(self, code: str, message: str, text: str) -> str:
        response = self.snapshot("failed", text=text)
        response["error"] = {"code": code, "message": message}
        return (self.event("error", code=code, message=message, param=None)
                + self.event("response.failed", response=response))


def register_responses_routes(app: FastAPI, st) -> None:
    engine = st.engine

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, raw: Request):
        model = st.check_model(body.model)
        check_supported(body)
        st.generative("responses")
        messages = [ChatMessage(**m) for m in input_messages(body)]
        try:
            prompt = await st.chat_prompt(messages)
        except APIError as err:   # the conversation is this API's input, whatever chat calls it
            if err.param == "messages":
                err.param = "input"
            raise
        room = engine.max_model_len - len(prompt.token_ids)
        if body.max_output_tokens is not None and body.max_output_tokens > room:
            raise APIError(400, f"the input has {len(prompt.token_ids)} tokens, so at most {room} more fit in "
                                f"the model's context ({engine.max_model_len}); max_output_tokens is "
                                f"{body.max_output_tokens}", param="max_output_tokens")
        params = sampling(body, st.defaults, room)
        rid = f"resp_{uuid.uuid4().hex}"
        request = st.make_request(rid, dataclasses.replace(prompt, text=None), params, "input")
        view = ResponseView(rid, model, body, params)
        if body.stream:
            handles = st.submit([request])   # 429 / 413 before the stream starts
            return st.stream_response(view.events(st, handles), handles)   # lets go of them however it ends
        return await st.respond([request], view, body, raw)
