"""The input processor: the one place where prompts are normalized and requests validated.

    prompts = processor.prompts(["Hello", [1, 2, 3]])      # -> [Prompt(text, token_ids), ...]
    prompts = processor.chat(messages)                      # the tokenizer's chat template
    request = processor.process("r1", prompts[0], params)   # -> Request, ValueError if it can never run

``Engine``, ``AsyncEngine``, the server and the command line all call it, so a prompt or a
SamplingParams is accepted or refused by the same rules (and with the same message) everywhere;
the server only maps the ValueError to an HTTP 400. Nothing here touches engine state, so a
server may run it off its event loop and before queueing.

A prompt is a string (tokenized with the model's tokenizer), a list of token ids, a ``Prompt``,
or, as in vLLM, a dict {"prompt": text} or {"prompt_token_ids": ids} with an optional
"cache_salt" (requests share prefix-cache blocks only with requests of the same salt); a batch
is a list of those. Checks, against the model:
    prompt     non-empty, integer ids in [0, vocab_size), at most max_model_len tokens
               (max_model_len - 1 for generation, which must leave room for one token)
    params     prompt + max_tokens <= max_model_len, and fits the whole KV cache;
               n <= max_num_seqs (the n samples of a request run together);
               stop strings need a tokenizer; logprobs, prompt_logprobs <= vocab_size;
               logit_bias keys inside the vocabulary; structured_outputs parse (a valid schema,
               regex or grammar, with no JSON-schema feature left unenforced); seeds and value
               ranges are checked by SamplingParams itself
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from lepton.engine.metrics import RequestMetrics
from lepton.engine.sequence import Request
from lepton.engine.structured_output.grammar import build_grammar
from lepton.engine.token_constraints import bad_words_token_ids
from lepton.sampling_params import SamplingParams
from lepton.tokenizer import apply_chat_template, encode


@dataclass
class Prompt:
    """A normalized prompt: its token ids and, when it was given as text, the text."""

    text: str | None
    token_ids: list[int]
    token_type_ids: list[int] | None = None
    cache_salt: str | None = None     # its prefix-cache partition (None: the shared one)


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


MAX_CACHE_SALT_CHARS = 1024   # a salt names a partition; longer ones only cost hashing time


def check_cache_salt(cache_salt) -> str | None:
    """``cache_salt`` if it is None or a non-empty string of valid Unicode, else ValueError."""
    if cache_salt is None:
        return None
    if not isinstance(cache_salt, str) or not cache_salt or len(cache_salt) > MAX_CACHE_SALT_CHARS:
        raise ValueError(f"cache_salt must be a non-empty string of at most {MAX_CACHE_SALT_CHARS} "
                         f"characters, got {cache_salt!r:.80}")
    try:
        cache_salt.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("cache_salt holds a lone UTF-16 surrogate, which is not valid Unicode text") from None
    return cache_salt


_INT_ONLY = frozenset({int})   # bool is not a token id, though a subclass of int


def _is_token_ids(value) -> bool:
    # A loop in C: a server calls this on its event loop, on prompts of up to a million ids.
    return isinstance(value, (list, tuple)) and bool(value) and _INT_ONLY.issuperset(map(type, value))


class InputProcessor:
    def __init__(self, tokenizer, limits: ModelLimits):
        self.tokenizer = tokenizer
        self.limits = limits

    # ---- prompts ----------------------------------------------------------------------------
    @staticmethod
    def split(prompts, *, what: str = "prompts") -> list:
        """One prompt or a batch of them -> the list of single prompts, not tokenized yet (so a
        server can count them before paying for tokenization)."""
        if isinstance(prompts, (str, Prompt, dict)) or _is_token_ids(prompts):
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
        if isinstance(prompt, dict):
            return self._dict_prompt(prompt, label, add_special_tokens)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model folder has no tokenizer: pass prompts as token ids")
            ids, types = encode(self.tokenizer, prompt, add_special_tokens)
            return Prompt(prompt, ids, types)
        if isinstance(prompt, (list, tuple)):
            return Prompt(None, list(prompt))
        raise ValueError(f"{label} must be a string or a list of token ids, got {type(prompt).__name__}")

    def _dict_prompt(self, prompt: dict, label: str, add_special_tokens: bool) -> Prompt:
        """vLLM's TextPrompt / TokensPrompt: one of "prompt" and "prompt_token_ids", and an
        optional "cache_salt"."""
        unknown = set(prompt) - {"prompt", "prompt_token_ids", "cache_salt"}
        if unknown:
            raise ValueError(f"{label}: unknown keys {sorted(map(str, unknown))}; a dict prompt holds "
                             "'prompt' or 'prompt_token_ids', and optionally 'cache_salt'")
        if ("prompt" in prompt) == ("prompt_token_ids" in prompt):
            raise ValueError(f"{label}: a dict prompt holds exactly one of 'prompt' and 'prompt_token_ids'")
        inner = prompt["prompt"] if "prompt" in prompt else prompt["prompt_token_ids"]
        if ("prompt" in prompt) != isinstance(inner, str):
            raise ValueError(f"{label}: 'prompt' must be a string and 'prompt_token_ids' a list of token ids")
        try:
            salt = check_cache_salt(prompt.get("cache_salt"))
        except ValueError as err:
            raise ValueError(f"{label}: {err}") from None
        return dataclasses.replace(self.prompt(inner, add_special_tokens=add_special_tokens), cache_salt=salt)

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
        # The length first, so a prompt far too long (a server gets prompts of up to a million ids)
        # is refused without a look at its ids; the ids are then scanned by loops in C (type, min,
        # max), each holding the GIL briefly, where a Python loop would hold it in 5 ms slices.
        limit = limits.max_model_len - 1 if generation else limits.max_model_len
        if len(token_ids) > limit:
            room = " and leave room for one generated token" if generation else ""
            raise ValueError(f"{label} has {len(token_ids)} tokens; it must fit max_model_len "
                             f"({limits.max_model_len}){room}")
        if not _INT_ONLY.issuperset(map(type, token_ids)):
            raise ValueError(f"{label}: token ids must be integers")
        if min(token_ids) < 0 or max(token_ids) >= limits.vocab_size:
            bad = next(t for t in token_ids if not 0 <= t < limits.vocab_size)
            raise ValueError(f"{label}: token id {bad} is outside the vocabulary [0, {limits.vocab_size})")

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
        outside = [t for t in params.allowed_token_ids or () if t >= vocab]
        if outside:
            raise ValueError(f"allowed_token_ids {outside[:10]} are outside the vocabulary [0, {vocab})")
        if params.bad_words and self.tokenizer is None:
            raise ValueError("bad_words need a tokenizer; give bad_words_token_ids")
        if params.structured_outputs is not None:
            if self.tokenizer is None:
                raise ValueError("structured outputs need the model's tokenizer")
            build_grammar(params.structured_outputs)   # parsed here, so a bad spec is refused now
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
                arrival_time: float | None = None, priority: int = 0, label: str | None = None,
                cache_salt: str | None = None) -> Request:
        """A validated, tokenized generation request; ValueError with the reason when it can never
        run. ``label`` names the request in messages (default "request <id>"). ``cache_salt``
        (default: the prompt's own) keeps its prefix-cache blocks apart from other salts'."""
        self.require_generative("generation")
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        prompt = self.prompt(prompt)
        cache_salt = check_cache_salt(prompt.cache_salt if cache_salt is None else cache_salt)
        label = label or f"request {request_id}"
        self.check_prompt(prompt.token_ids, label, generation=True)
        total = self.check_params(params, len(prompt.token_ids), label)
        if params.bad_words:   # tokenized once, here, for the sampler
            words = bad_words_token_ids(self.tokenizer, params.bad_words)
            params = dataclasses.replace(params, bad_words_token_ids=words + list(params.bad_words_token_ids or []))
        arrival = time.monotonic() if arrival_time is None else arrival_time
        return Request(request_id, prompt.text, list(prompt.token_ids), params, priority, order=0,
                       max_total_tokens=total, metrics=RequestMetrics(arrival), cache_salt=cache_salt)
