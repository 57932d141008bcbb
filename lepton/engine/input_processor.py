"""The input processor: the one place where prompts are normalized and requests validated.

    prompts = processor.prompts(["Hello", [1, 2, 3]])      # -> [Prompt(text, token_ids), ...]
    prompts = processor.chat(messages)                      # the tokenizer's chat template
    request = processor.process("r1", prompts[0], params)   # -> Request, ValueError if it can never run

``Engine``, ``AsyncEngine``, the server and the command line all call it, so a prompt or a
SamplingParams is accepted or refused by the same rules (and with the same message) everywhere;
the server only maps the ValueError to an HTTP 400. Nothing here touches engine state, so a
server may run it off its event loop and before queueing.

A prompt is a string (tokenized with the model's tokenizer), a list of token ids, or a
``Prompt``; a batch is a list of those. Checks, against the model:
    prompt     non-empty, integer ids in [0, vocab_size), at most max_model_len tokens
               (max_model_len - 1 for generation, which must leave room for one token)
    params     prompt + max_tokens <= max_model_len, and fits the whole KV cache;
               n <= max_num_seqs (the n samples of a request run together);
               stop strings need a tokenizer; logprobs, prompt_logprobs <= vocab_size;
               logit_bias keys inside the vocabulary; seeds and value ranges are checked by
               SamplingParams itself
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from lepton.engine.metrics import RequestMetrics
from lepton.engine.sequence import Request
from lepton.sampling_params import SamplingParams
from lepton.tokenizer import apply_chat_template, encode


@dataclass
class Prompt:
    """A normalized prompt: its token ids and, when it was given as text, the text."""

    text: str | None
    token_ids: list[int]
    token_type_ids: list[int] | None = None


@dataclass(frozen=True)
class ModelLimits:
    """What the model and the engine allow, as the input processor checks it."""

    vocab_size: int
    max_model_len: int
    is_generative: bool
    architecture: str
    max_num_seqs: int = 1
    cache_tokens: int | None = None     # the whole KV cache in tokens (None: no cache)
    block_size: int = 1


def _is_token_ids(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


class InputProcessor:
    def __init__(self, tokenizer, limits: ModelLimits):
        self.tokenizer = tokenizer
        self.limits = limits

    # ---- prompts ----------------------------------------------------------------------------
    @staticmethod
    def split(prompts, *, what: str = "prompts") -> list:
        """One prompt or a batch of them -> the list of single prompts, not tokenized yet (so a
        server can count them before paying for tokenization)."""
        if isinstance(prompts, (str, Prompt)) or _is_token_ids(prompts):
            return [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError(f"{what} must be a non-empty string, token-id list, or list of those")
        return list(prompts)

    def prompts(self, prompts, *, what: str = "prompts") -> list[Prompt]:
        """One prompt or a batch of them -> Prompts (tokenized, not yet checked)."""
        return [self.prompt(p, i) for i, p in enumerate(self.split(prompts, what=what))]

    def prompt(self, prompt, index: int | None = None, *, add_special_tokens: bool = True) -> Prompt:
        label = "prompt" if index is None else f"prompt {index}"
        if isinstance(prompt, Prompt):
            return prompt
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model folder has no tokenizer: pass prompts as token ids")
            ids, types = encode(self.tokenizer, prompt, add_special_tokens)
            return Prompt(prompt, ids, types)
        if isinstance(prompt, (list, tuple)):
            return Prompt(None, list(prompt))
        raise ValueError(f"{label} must be a string or a list of token ids, got {type(prompt).__name__}")

    def chat(self, messages, chat_template: str | None = None,
             add_generation_prompt: bool = True) -> list[Prompt]:
        """A conversation [{"role", "content"}, ...] or a list of conversations -> Prompts, through
        the tokenizer's chat template (or ``chat_template``)."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a conversation (list of dicts) or a list of conversations")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        out = []
        for conversation in conversations:
            ids = apply_chat_template(self.tokenizer, list(conversation), chat_template, add_generation_prompt)
            out.append(Prompt(self.tokenizer.decode(ids), ids))
        return out

    def check_prompt(self, token_ids: list[int], label: str, generation: bool) -> None:
        """ValueError for an empty prompt, ids outside the vocabulary, or one too long."""
        limits = self.limits
        if not token_ids:
            raise ValueError(f"{label} is empty")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in token_ids):
            raise ValueError(f"{label}: token ids must be integers")
        bad = next((t for t in token_ids if not 0 <= t < limits.vocab_size), None)
        if bad is not None:
            raise ValueError(f"{label}: token id {bad} is outside the vocabulary [0, {limits.vocab_size})")
        limit = limits.max_model_len - 1 if generation else limits.max_model_len
        if len(token_ids) > limit:
            room = " and leave room for one generated token" if generation else ""
            raise ValueError(f"{label} has {len(token_ids)} tokens; it must fit max_model_len "
                             f"({limits.max_model_len}){room}")

    # ---- sampling parameters ------------------------------------------------------------------
    @staticmethod
    def params_per_prompt(sampling_params, count: int) -> list[SamplingParams]:
        """None, one SamplingParams for all, or one per prompt -> a list of ``count``."""
        if sampling_params is None:
            return [SamplingParams()] * count
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        if isinstance(sampling_params, (list, tuple)) and len(sampling_params) == count \
                and all(isinstance(p, SamplingParams) for p in sampling_params):
            return list(sampling_params)
        raise ValueError("sampling_params must be a SamplingParams or a list of them, one per prompt")

    def check_params(self, params: SamplingParams, num_prompt_tokens: int, label: str) -> int:
        """ValueError when ``params`` cannot run on this model; returns prompt + max_tokens."""
        limits, vocab = self.limits, self.limits.vocab_size
        if params.n > limits.max_num_seqs:
            raise ValueError(f"n ({params.n}) exceeds max_num_seqs ({limits.max_num_seqs}): the "
                             "samples of a request run together")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids")
        for name, value in (("logprobs", params.logprobs), ("prompt_logprobs", params.prompt_logprobs)):
            if value is not None and value > vocab:
                raise ValueError(f"{name} ({value}) exceeds the vocabulary size ({vocab})")
        bad = next((t for t in params.logit_bias or {} if t >= vocab), None)
        if bad is not None:
            raise ValueError(f"logit_bias names token id {bad}, outside the vocabulary [0, {vocab})")
        max_tokens = params.max_tokens if params.max_tokens is not None else limits.max_model_len - num_prompt_tokens
        total = num_prompt_tokens + max_tokens
        if total > limits.max_model_len:
            raise ValueError(f"{label}: the prompt has {num_prompt_tokens} tokens and max_tokens is "
                             f"{max_tokens}: {total} tokens exceed max_model_len ({limits.max_model_len}), "
                             "this model's maximum context length")
        if limits.cache_tokens is not None:
            needed = -(-total // limits.block_size) * limits.block_size
            if needed > limits.cache_tokens:
                raise ValueError(f"{label}: {total} tokens need more than the whole KV cache "
                                 f"({limits.cache_tokens} tokens)")
        return total

    # ---- requests ---------------------------------------------------------------------------------
    def require_generative(self, what: str) -> None:
        if not self.limits.is_generative:
            raise ValueError(f"{what} needs a causal language model; {self.limits.architecture} is not "
                             "one (use embed / classify / forward)")

    def process(self, request_id: str, prompt, params: SamplingParams | None = None, *,
                arrival_time: float | None = None, priority: int = 0, label: str | None = None) -> Request:
        """A validated, tokenized generation request; ValueError with the reason when it can never
        run. ``label`` names the request in messages (default "request <id>")."""
        self.require_generative("generation")
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        prompt = self.prompt(prompt)
        label = label or f"request {request_id}"
        self.check_prompt(prompt.token_ids, label, generation=True)
        total = self.check_params(params, len(prompt.token_ids), label)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        return Request(request_id, prompt.text, list(prompt.token_ids), params, priority, order=0,
                       max_total_tokens=total, metrics=RequestMetrics(arrival))
