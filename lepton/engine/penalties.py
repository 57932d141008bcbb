"""Logits processors run before sampling, in place on the sampler's own copy of z[B,V] (float32).

In this order, per row b with the step's SamplingMetadata:
    min_tokens   while steps_b < min_tokens_b: z[t] = -inf for t in stop_token_ids_b and eos
                 (eos unless ignore_eos_b)
    logit_bias   z[t] += bias[t]
    allowed_token_ids, bad_words   z[t] = -inf for the tokens a row may not sample (token_constraints.py)
    grammar      z[t] = -inf for the tokens a row's grammar forbids next (structured_output/bitmask.py)
    repetition   for t in prompt | output: z[t] = z[t] / r if z[t] > 0 else z[t] * r    (HF transformers)
    frequency, presence, with c_t the count of t in the output (OpenAI):
                 z[t] -= frequency_penalty * c_t + presence_penalty * (c_t > 0)
Each is a few whole-batch tensor ops (a scatter over the rows' token tensors, then elementwise
math), with no loop over rows; rows that do not use a processor get its neutral value and come
out bit-for-bit unchanged. Token ids >= V (an embedding table larger than the lm_head) can never
be sampled and are skipped, except in logit_bias, where naming one is the caller's error.
"""

from __future__ import annotations

import torch

from lepton.engine.sampling_metadata import SamplingMetadata
from lepton.engine.structured_output.bitmask import apply_token_bitmask
from lepton.engine.token_constraints import apply_token_masks


def apply_logits_processors(z: torch.Tensor, md: SamplingMetadata, eos_token_ids: torch.Tensor | None) -> None:
    if md.min_tokens is not None:
        ban_stop_tokens(z, md, eos_token_ids)
    if md.logit_bias is not None:
        add_logit_bias(z, md.logit_bias)
    if md.token_masks is not None:
        apply_token_masks(z, md.token_masks)
    if md.token_bitmask is not None:
        apply_token_bitmask(z, md.token_bitmask)
    if md.token_ids is not None:
        apply_penalties(z, md)


def ban_stop_tokens(z: torch.Tensor, md: SamplingMetadata, eos_token_ids: torch.Tensor | None) -> None:
    """min_tokens: -inf on the tokens that would end a row's completion too early."""
    count, vocab = z.shape
    banned = md.stop_token_ids   # [B, S], -1 = padding
    if eos_token_ids is not None and eos_token_ids.numel():
        eos = eos_token_ids.to(banned.device).expand(count, -1).masked_fill(md.ignore_eos[:, None], -1)
        banned = torch.cat([banned, eos], dim=1)
    ban = (banned >= 0) & (banned < vocab) & (md.steps < md.min_tokens)[:, None]
    # A scatter of min(z, x): x = -inf bans, x = +inf (padding, finished rows) leaves z as it is,
    # whichever of several writes to one entry lands first.
    values = torch.full(banned.shape, float("inf"), dtype=z.dtype, device=z.device).masked_fill_(ban, float("-inf"))
    z.scatter_reduce_(1, banned.clamp(0, vocab - 1), values, "amin")


def add_logit_bias(z: torch.Tensor, bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    rows, ids, values = bias
    top = int(ids.max())
    if top >= z.shape[1]:
        raise ValueError(f"logit_bias names token {top}, outside the vocabulary of {z.shape[1]} tokens")
    z.index_put_((rows, ids), values.to(z.dtype), accumulate=True)


def apply_penalties(z: torch.Tensor, md: SamplingMetadata) -> None:
    """Repetition, then frequency and presence penalties, from token counts of the rows'
    prompt and output parts, made by one scatter_add each."""
    count, vocab = z.shape
    ids = md.token_ids
    position = torch.arange(ids.shape[1], device=ids.device)
    valid = (ids >= 0) & (ids < vocab) & (position < md.seq_lens[:, None])
    output = valid & (position >= md.prompt_lens[:, None])
    index = ids.clamp(0, vocab - 1)   # entries not valid add 0 wherever they point

    def counts(where: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(z).scatter_add_(1, index, where.to(z.dtype))

    if md.repetition_penalty is not None:
        seen = counts(valid) > 0
        r = md.repetition_penalty[:, None]
        z.copy_(torch.where(seen, torch.where(z > 0, z / r, z * r), z))
    if md.frequency_penalty is not None or md.presence_penalty is not None:
        output_counts, penalty = counts(output), torch.zeros_like(z)
        if md.frequency_penalty is not None:
            penalty.addcmul_(output_counts, md.frequency_penalty[:, None])
        if md.presence_penalty is not None:
            penalty.addcmul_((output_counts > 0).to(z.dtype), md.presence_penalty[:, None])
        z.sub_(penalty)
