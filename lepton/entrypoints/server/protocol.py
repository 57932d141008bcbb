"""Request bodies of the OpenAI-compatible API, and their translation to SamplingParams.

Fields follow OpenAI's completions and chat completions APIs, plus vLLM's extensions (top_k,
min_p, repetition_penalty, ignore_eos, min_tokens, stop_token_ids, cache_salt). Unknown fields
are ignored, as OpenAI's own server does. Unset sampling fields take the checkpoint's
generation_config.json defaults, then OpenAI's.
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, model_validator

from lepton.engine.input_processor import MAX_CACHE_SALT_CHARS
from lepton.sampling_params import RequestOutputKind, SamplingParams
from lepton.entrypoints.server.errors import APIError


def _not_a_bool(value: Any) -> Any:
    # pydantic's lax mode reads true as 1 for a number; JSON booleans are not numbers.
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    return value


Int = Annotated[int, BeforeValidator(_not_a_bool)]
Float = Annotated[float, BeforeValidator(_not_a_bool)]
# A body may hold millions of token ids, validated on the event loop: strict ints (no boolean, no
# float) are checked in pydantic's core, without a Python call per id, and fail_fast stops at the
# first bad item instead of collecting an error per item (as a union's other members would).
TokenIds = Annotated[list[Annotated[int, Strict()]], Field(fail_fast=True)]
Prompts = Union[str, Annotated[list[str], Field(fail_fast=True)], TokenIds,
                Annotated[list[TokenIds], Field(fail_fast=True)]]
_SCALARS = frozenset({int, float, bool, type(None)})


def _surrogate_at(value: Any, where: str) -> str | None:
    """Where in a parsed JSON value a string holds a lone UTF-16 surrogate ("\\ud800" escapes
    without their pair): Python's json accepts them, but they are not Unicode text, and the
    tokenizer, the detokenizer and the response encoder all fail on them. None when there is none."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
    elif isinstance(value, dict):
        for key, item in value.items():
            inner = f"{where}.{key}" if where else str(key)
            if _surrogate_at(key, inner) is not None:
                return f"a key of {where or 'the body'}"
            found = _surrogate_at(item, inner)
            if found is not None:
                return found
    elif isinstance(value, list):
        if _SCALARS.issuperset(map(type, value)):   # token ids: no text, skipped at C speed
            return None
        for i, item in enumerate(value):
            found = _surrogate_at(item, f"{where}[{i}]")
            if found is not None:
                return found
    return None


class RequestBody(BaseModel):
    """A route's JSON body: unknown fields ignored, and no string may hold a lone surrogate."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data: Any) -> Any:
        where = _surrogate_at(data, "")
        if where is not None:
            raise ValueError(f"{where or 'the body'} holds a lone UTF-16 surrogate (an unpaired \\ud800-"
                             f"\\udfff escape), which is not valid Unicode text")
        return data


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(RequestBody):
    model: str | None = None
    max_tokens: Int | None = Field(default=None, ge=1)
    temperature: Float | None = Field(default=None, ge=0)
    top_p: Float | None = Field(default=None, gt=0, le=1)
    top_k: Int | None = None
    min_p: Float | None = Field(default=None, ge=0, le=1)
    n: Int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    stop_token_ids: list[Int] | None = None
    seed: Int | None = Field(default=None, ge=0, lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: Float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: Float | None = Field(default=None, gt=0)
    logit_bias: dict[str, Float] | None = None
    ignore_eos: bool = False
    min_tokens: Int = Field(default=0, ge=0)
    user: str | None = None
    skip_special_tokens: bool = True
    # vLLM's: requests share prefix-cache blocks only with requests of the same salt.
    cache_salt: str | None = Field(default=None, min_length=1, max_length=MAX_CACHE_SALT_CHARS)


class CompletionRequest(_Common):
    prompt: Prompts
    logprobs: Int | None = Field(default=None, ge=0)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: Union[str, list[dict[str, Any]], None] = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Int | None = Field(default=None, ge=0)
    add_generation_prompt: bool = True


# /v1/embeddings, /tokenize and the other pooling routes: protocol_pooling.py; /v1/responses:
# protocol_responses.py.


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: TokenIds


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    """Messages as the chat template wants them; content parts [{"type": "text", ...}] joined."""
    out = []
    for m in messages:
        content = m.content
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if part.get("type") == "text")
        out.append({"role": m.role, "content": content or ""})
    return out


_DEFAULTS_FROM_CONFIG = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_params(req: _Common, *, max_tokens: int, logprobs: int | None, defaults: dict,
                    limits: dict, stream: bool) -> SamplingParams:
    """SamplingParams for a request; APIError(400) naming the field for values out of range."""
    if req.n > limits["max_n"]:
        raise APIError(400, f"n must be at most {limits['max_n']}, got {req.n}", param="n")
    if logprobs is not None and logprobs > limits["max_logprobs"]:
        raise APIError(400, f"logprobs must be at most {limits['max_logprobs']}, got {logprobs}",
                       param="logprobs")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > limits["max_stop"]:
        raise APIError(400, f"at most {limits['max_stop']} stop strings, got {len(stop)}", param="stop")
    fields = {name: getattr(req, name) if getattr(req, name) is not None else defaults.get(name)
              for name in _DEFAULTS_FROM_CONFIG}
    kwargs = {k: v for k, v in fields.items() if v is not None}
    if kwargs.get("top_k") == 0:
        kwargs["top_k"] = -1     # 0 means "off" in HF's generation_config
    try:
        return SamplingParams(
            n=req.n, max_tokens=max_tokens, stop=stop, stop_token_ids=req.stop_token_ids, seed=req.seed,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            logit_bias=req.logit_bias, ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
            logprobs=logprobs, skip_special_tokens=req.skip_special_tokens,
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY, **kwargs)
    except ValueError as err:
        message = str(err)
        raise APIError(400, message, param=message.split(" ", 1)[0]) from None
