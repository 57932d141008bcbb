"""Sampling parameters (as in vLLM) and the batched sampler.

For each row of next-token logits z[V] (float32):
    logprobs  = log_softmax(z)                       raw model distribution, reported as logprobs
    greedy    (temperature 0): argmax z
    otherwise p = softmax(mask(z / temperature))     mask: keep the top_k tokens, then the smallest
                                                     prefix of the sorted tokens whose mass reaches
                                                     top_p (at least one token)
              token = argmax_i p_i / E_i,  E_i ~ Exp(1) from the request's own torch.Generator
The exponential race draws exactly from p, and every row uses its own generator, so a seeded
request samples the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SAMPLING_EPS = 1e-5   # temperatures below this are greedy


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How to generate one request's completions.

    n: completions per prompt; temperature: 0 = greedy; top_p in (0, 1]; top_k: -1 = off, else
    >= 1; seed: per-request generator seed (None: drawn from the engine's seed); max_tokens:
    tokens to generate at most (None: up to max_model_len); stop: strings that end a completion
    (not included in the text); stop_token_ids: token ids that end it (included in token_ids);
    ignore_eos: keep going after eos; logprobs: also return the top-N logprobs per token (0: only
    the sampled token's); skip_special_tokens: when detokenizing.
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

    def __post_init__(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) \
                or not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool) \
                or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or not (self.top_k == -1 or self.top_k >= 1):
            raise ValueError(f"top_k must be -1 (disabled) or an integer >= 1, got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise ValueError(f"seed must be None or an integer >= 0, got {self.seed!r}")
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
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise ValueError(f"logprobs must be None or an integer >= 0, got {self.logprobs!r}")
        if not isinstance(self.skip_special_tokens, bool):
            raise ValueError(f"skip_special_tokens must be True or False, got {self.skip_special_tokens!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS


@dataclass
class SamplerOutput:
    """Per row: the sampled token, its logprob and rank; top-N (N = the largest logprobs asked
    for in the batch) token ids and logprobs, or None when no row asked."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int] | None
    top_ids: list[list[int]] | None
    top_logprobs: list[list[float]] | None


def _mask_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits[R,V] with tokens outside each row's top_k / top_p nucleus set to -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    keep = ranks < top_k[:, None]
    sorted_logits = sorted_logits.masked_fill(~keep, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token once the mass before it already reaches top_p; the first token always stays.
    keep &= (probs.cumsum(dim=-1) - probs) < top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(~keep, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator]) -> SamplerOutput:
    """One vectorized pass over logits[B,V]; ``generators[b]`` drives row b (see module doc)."""
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    token_ids = logits.argmax(dim=-1)
    rows = [b for b, p in enumerate(params) if not p.greedy]
    if rows:
        index = torch.tensor(rows, device=logits.device)
        temps = torch.tensor([params[b].temperature for b in rows], device=logits.device)
        scaled = logits[index] / temps[:, None]
        if any(params[b].top_k > 0 or params[b].top_p < 1 for b in rows):
            vocab = logits.shape[-1]
            top_k = torch.tensor([params[b].top_k if params[b].top_k > 0 else vocab for b in rows],
                                 device=logits.device)
            top_p = torch.tensor([params[b].top_p for b in rows], device=logits.device)
            scaled = _mask_top_k_top_p(scaled, top_k, top_p)
        probs = scaled.softmax(dim=-1)
        noise = torch.empty_like(probs)
        for i, b in enumerate(rows):   # per-request streams: torch has no batched form
            noise[i].exponential_(generator=generators[b])
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        token_ids[index] = (probs / noise).argmax(dim=-1)
    chosen = logprobs.gather(1, token_ids[:, None])
    want = [p.logprobs for p in params if p.logprobs is not None]
    ranks = top_ids = top_lp = None
    if want:
        ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
        if max(want) > 0:
            values, ids = logprobs.topk(min(max(want), logprobs.shape[-1]), dim=-1)
            top_ids, top_lp = ids.tolist(), values.tolist()
    return SamplerOutput(token_ids.tolist(), chosen[:, 0].tolist(), ranks, top_ids, top_lp)
