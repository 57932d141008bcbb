"""Sampling parameters of one request, as in vLLM; the sampler itself is lepton/engine/sampler.py."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from lepton.engine.structured_output.params import StructuredOutputsParams

SAMPLING_EPS = 1e-5   # temperatures below this are greedy
LOGIT_BIAS_LIMIT = 100.0   # OpenAI's range for logit_bias values


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0   # every output carries the whole text so far
    DELTA = 1        # every output carries only what is new since the last one
    FINAL_ONLY = 2   # one output, when the request finishes


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bias_key(key) -> int:
    if isinstance(key, str) and key.isascii() and key.isdigit():
        key = int(key)   # JSON object keys arrive as strings
    if not _is_int(key) or key < 0:
        raise ValueError(f"logit_bias keys must be token ids >= 0, got {key!r}")
    return key


@dataclass
class SamplingParams:
    """How to generate one request's completions.

    n: completions per prompt.
    temperature: divides the logits; 0 = greedy.
    top_p: keep the smallest set of most likely tokens whose mass reaches top_p, in (0, 1].
    top_k: keep the top_k most likely tokens; -1 = off, else >= 1.
    min_p: drop tokens less likely than min_p times the most likely one, in [0, 1].
    seed: per-request generator seed, an int64 or uint64 (None: drawn from the engine's seed).
    max_tokens: tokens to generate at most (None: up to max_model_len).
    min_tokens: eos and stop_token_ids are banned until this many tokens were generated.
    stop: strings that end a completion (not in the text unless include_stop_str_in_output).
    stop_token_ids: token ids that end a completion (included in token_ids).
    include_stop_str_in_output: keep the stop string that ended the completion in its text.
    allowed_token_ids: only these tokens may be sampled (None: any).
    bad_words: words never generated (engine/token_constraints.py); bad_words_token_ids: their
        token ids, which the engine fills in from bad_words (or a caller without a tokenizer gives).
    ignore_eos: keep going after eos.
    presence_penalty: subtracted once from every token already generated, in [-2, 2].
    frequency_penalty: subtracted per occurrence of a token already generated, in [-2, 2].
    repetition_penalty: HF style, for tokens in the prompt or generated; 1 = off, > 0.
    logit_bias: token id -> value added to its logit, values clamped to [-100, 100].
    logprobs: also return the top-N logprobs per token (0: only the sampled token's).
    prompt_logprobs: also return the top-N logprobs of every prompt token.
    skip_special_tokens: when detokenizing.
    output_kind: cumulative, delta or final-only outputs when streaming.
    structured_outputs: a JSON schema, regex, choice or grammar the output follows (a
        StructuredOutputsParams or a dict of its fields; engine/structured_output/).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    max_tokens: int | None = 16
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    bad_words_token_ids: list[list[int]] | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if not _is_number(self.temperature) or not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or not (self.top_k == -1 or self.top_k >= 1):
            raise ValueError(f"top_k must be -1 (disabled) or an integer >= 1, got {self.top_k!r}")
        # Any int64 (vLLM's range) or uint64: s and s + 2**64 name the same stream (seed_key).
        if self.seed is not None and (not _is_int(self.seed) or not -2**63 <= self.seed < 2**64):
            raise ValueError(f"seed must be None or an integer in [-2**63, 2**64), got {self.seed!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be None or an integer >= 1, got {self.max_tokens!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and not isinstance(self.stop, (list, tuple)):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        self.stop = list(self.stop or [])
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of non-negative integers, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"{name} must be None or an integer >= 0, got {value!r}")
        self._check_filters_and_penalties()
        if not _is_int(self.min_tokens) or self.min_tokens < 0 \
                or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], "
                             f"got {self.min_tokens!r}")
        if self.logit_bias is not None:
            self.logit_bias = self._checked_logit_bias(self.logit_bias)
        self._check_token_constraints()
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.of(self.structured_outputs)
        if not isinstance(self.output_kind, RequestOutputKind):
            raise ValueError(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}")

    def _check_filters_and_penalties(self) -> None:
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
        if not _is_number(self.repetition_penalty) or not 0 < self.repetition_penalty < float("inf"):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")

    def _check_token_constraints(self) -> None:
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, (list, tuple)) or not self.allowed_token_ids \
                    or not all(_is_int(t) and t >= 0 for t in self.allowed_token_ids):
                raise ValueError(f"allowed_token_ids must be a non-empty list of token ids >= 0, "
                                 f"got {self.allowed_token_ids!r}")
            self.allowed_token_ids = sorted(set(self.allowed_token_ids))
        if self.bad_words is not None:
            if not isinstance(self.bad_words, (list, tuple)) or not all(isinstance(w, str) and w.strip()
                                                                        for w in self.bad_words):
                raise ValueError(f"bad_words must be a list of non-blank strings, got {self.bad_words!r}")
            self.bad_words = list(self.bad_words)
        if self.bad_words_token_ids is not None:
            words = self.bad_words_token_ids
            if not isinstance(words, (list, tuple)) or not all(
                    isinstance(w, (list, tuple)) and w and all(_is_int(t) and t >= 0 for t in w) for w in words):
                raise ValueError(f"bad_words_token_ids must be lists of token ids >= 0, got {words!r}")
            self.bad_words_token_ids = [list(w) for w in words]

    @staticmethod
    def _checked_logit_bias(bias) -> dict[int, float]:
        if not isinstance(bias, dict):
            raise ValueError(f"logit_bias must be a dict of token id -> number, got {bias!r}")
        checked = {}
        for key, value in bias.items():
            if not _is_number(value) or not math.isfinite(value):
                raise ValueError(f"logit_bias values must be finite numbers, got {value!r} for {key!r}")
            checked[_bias_key(key)] = float(min(max(value, -LOGIT_BIAS_LIMIT), LOGIT_BIAS_LIMIT))
        return checked

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0
