"""The sampler's input for one step: per-row parameter tensors, and the seeded rows' noise streams.

Row b of every [B] or [B, ...] tensor belongs to row b of the step's logits. A field that no row of
the step needs is None, so the common batch (temperature and top_p, no penalties) pays for nothing
else. ``from_params`` builds one from SamplingParams from scratch (tests, the reference); the
persistent batch (model_executor/input_batch.py) fills the same fields from its arrays.

Seeded rows race with noise from a counter-based hash of (seed, step, token id) instead of a
stateful generator (lepton_kernels/sampling/noise.py): a row's draw needs no per-row generator call
and depends on nothing but its seed, its step and its logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from lepton_kernels.sampling.noise import as_int64, stream_keys

from lepton.engine.token_constraints import TokenMasks, host_masks, token_masks
from lepton.sampling_params import SamplingParams


@dataclass
class SamplingMetadata:
    """Per-row sampling state of one step (B rows, on the logits' device).

    temperature [B] f32     rows below SAMPLING_EPS are greedy (argmax)
    all_greedy, all_random  host-side: every row greedy / none greedy
    all_seeded              host-side: every row seeded (the sampler then draws nothing from the
                            shared generator, and needs no device sync to find that out)
    top_k [B] i64           0 = off                      None: no row uses it
    top_p [B] f32           1.0 = off                    None: no row uses it
    min_p [B] f32           0.0 = off                    None: no row uses it
    keys [B] i64            a seeded row's race key at this step, stream_keys(seed, step); 0 in others
    seeded [B] bool         rows drawing from their own (seed, step) stream, the others from
                            the shared generator; keys and seeded are None when no row is seeded
    steps [B] i64           output tokens generated so far: the seeded rows' counter and
                            min_tokens' clock; None when no row is seeded or banning
    min_tokens [B] i64      with stop_token_ids [B, S] (padded with -1) and ignore_eos [B] bool:
                            while steps < min_tokens, stop_token_ids and (unless ignore_eos) eos
                            are banned; all three None when no row bans anything this step
    logit_bias              flat (rows, token ids, values): z[rows, ids] += values
    token_masks             allowed_token_ids and bad_words of this step (token_constraints.py)
    token_bitmask           (bitmask [C, W] int32, rows [C] i64): the grammar rows' allowed tokens
                            (structured_output/bitmask.py)
    token_ids [B, L] i64    prompt + output tokens, any value past seq_lens; with prompt_lens and
                            seq_lens [B] i64, only when a row has penalties
    repetition_penalty, frequency_penalty, presence_penalty [B] f32   None: no row uses it
    num_logprobs            per row, host-side: top-N logprobs to return, -1 = none; None: no row asks
    """

    temperature: torch.Tensor
    all_greedy: bool
    all_random: bool
    all_seeded: bool = False
    top_k: torch.Tensor | None = None
    top_p: torch.Tensor | None = None
    min_p: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    seeded: torch.Tensor | None = None
    steps: torch.Tensor | None = None
    min_tokens: torch.Tensor | None = None
    stop_token_ids: torch.Tensor | None = None
    ignore_eos: torch.Tensor | None = None
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    token_masks: TokenMasks | None = None
    token_bitmask: tuple[torch.Tensor, torch.Tensor] | None = None
    token_ids: torch.Tensor | None = None
    prompt_lens: torch.Tensor | None = None
    seq_lens: torch.Tensor | None = None
    repetition_penalty: torch.Tensor | None = None
    frequency_penalty: torch.Tensor | None = None
    presence_penalty: torch.Tensor | None = None
    num_logprobs: list[int] | None = None

    @property
    def num_rows(self) -> int:
        return self.temperature.shape[0]

    @property
    def needs_processors(self) -> bool:
        return (self.min_tokens is not None or self.logit_bias is not None or self.token_ids is not None
                or self.token_masks is not None or self.token_bitmask is not None)

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams], *, device: torch.device | str,
                    seeds: Sequence[int | None] | None = None, steps: Sequence[int] | None = None,
                    prompt_token_ids: Sequence[Sequence[int]] | None = None,
                    output_token_ids: Sequence[Sequence[int]] | None = None) -> SamplingMetadata:
        """Metadata for rows with these params. seeds: each row's stream seed, None for an
        unseeded row (default: each params' seed); steps: each row's output length (default: that
        of output_token_ids, else 0). The token lists are read only when a row has penalties."""
        count = len(params)
        for name, value in (("seeds", seeds), ("steps", steps), ("prompt_token_ids", prompt_token_ids),
                            ("output_token_ids", output_token_ids)):
            if value is not None and len(value) != count:
                raise ValueError(f"{name} must have one entry per row ({count}), got {len(value)}")
        if steps is None:
            steps = [len(o) for o in output_token_ids] if output_token_ids is not None else [0] * count
        seeds = [p.seed for p in params] if seeds is None else seeds

        def tensor(values, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        greedy = [p.greedy for p in params]
        md = cls(tensor([p.temperature for p in params], torch.float32), all(greedy), not any(greedy))
        if any(p.top_k > 0 for p in params):
            md.top_k = tensor([max(p.top_k, 0) for p in params], torch.int64)
        for name, off in (("top_p", 1.0), ("min_p", 0.0)):
            if any(getattr(p, name) != off for p in params):
                setattr(md, name, tensor([getattr(p, name) for p in params], torch.float32))
        seeded = [s is not None for s in seeds]
        if any(seeded):
            keys = stream_keys(np.array([seed_key(s) if s is not None else 0 for s in seeds], dtype=np.int64),
                               np.array(list(steps), dtype=np.int64))
            md.keys = torch.from_numpy(np.where(seeded, keys, 0)).to(device)
            md.all_seeded = all(seeded)
            md.seeded = tensor(seeded, torch.bool)
        banning = [n < p.min_tokens for n, p in zip(steps, params)]
        if any(seeded) or any(banning):
            md.steps = tensor(list(steps), torch.int64)
        if any(banning):
            md.min_tokens = tensor([p.min_tokens for p in params], torch.int64)
            md.stop_token_ids = _padded([p.stop_token_ids for p in params], -1, device)
            md.ignore_eos = tensor([p.ignore_eos for p in params], torch.bool)
        if any(p.logit_bias for p in params):
            biased = [(b, t, v) for b, p in enumerate(params) for t, v in (p.logit_bias or {}).items()]
            rows, ids, values = zip(*biased)
            md.logit_bias = (tensor(rows, torch.int64), tensor(ids, torch.int64), tensor(values, torch.float32))
        constrained = [(b, p.allowed_token_ids, p.bad_words_token_ids,
                        output_token_ids[b] if output_token_ids is not None else ())
                       for b, p in enumerate(params) if p.allowed_token_ids is not None or p.bad_words_token_ids]
        if constrained:
            md.token_masks = token_masks(host_masks(constrained, count), device)
        if any(p.needs_penalties for p in params):
            _add_penalties(md, params, prompt_token_ids, output_token_ids, device)
        if any(p.logprobs is not None for p in params):
            md.num_logprobs = [-1 if p.logprobs is None else p.logprobs for p in params]
        return md



def _add_penalties(md: SamplingMetadata, params: Sequence[SamplingParams], prompts, outputs, device) -> None:
    """The penalty fields of from_params: every row's tokens, padded, and the per-row penalties."""
    if prompts is None or outputs is None:
        raise ValueError("prompt_token_ids and output_token_ids are needed for rows with penalties")
    prompts, outputs = [list(p) for p in prompts], [list(o) for o in outputs]
    md.token_ids = _padded([p + o for p, o in zip(prompts, outputs)], 0, device)
    md.prompt_lens = torch.tensor([len(p) for p in prompts], dtype=torch.int64, device=device)
    md.seq_lens = md.prompt_lens + torch.tensor([len(o) for o in outputs], dtype=torch.int64, device=device)
    for name, off in (("repetition_penalty", 1.0), ("frequency_penalty", 0.0), ("presence_penalty", 0.0)):
        if any(getattr(p, name) != off for p in params):
            setattr(md, name, torch.tensor([getattr(p, name) for p in params], dtype=torch.float32,
                                             device=device))


def _padded(seqs: Sequence[Sequence[int]], fill: int, device) -> torch.Tensor:
    width = max((len(s) for s in seqs), default=0)
    return torch.tensor([list(s) + [fill] * (width - len(s)) for s in seqs], dtype=torch.int64,
                        device=device).view(len(seqs), width)


def seed_key(seed: int) -> int:
    """A seed in [0, 2**64) (SamplingParams.seed, a generator's seed) as the int64 with the same
    bits, one-to-one; int64 values pass unchanged."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not -2**63 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}")
    return as_int64(seed)
