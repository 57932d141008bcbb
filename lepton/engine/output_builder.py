"""Turn a request's state into a ``RequestOutput`` (cumulative, delta or final-only, as its
SamplingParams.output_kind says).

While a sequence runs, the last max(len(stop)) - 1 characters of its text are held back from
cumulative and delta outputs alike, so a stop string that is still forming is never shown; the
final output has everything. Hence, for every request, the streamed deltas concatenate to the
final text.
"""

from __future__ import annotations

import torch

from lepton.outputs import CompletionOutput, Logprob, RequestOutput
from lepton.engine.sampler import compute_logprobs
from lepton.sampling_params import RequestOutputKind
from lepton.engine.sequence import Request, Sequence, SequenceStatus


def build_logprobs(engine, token: int, logprob: float, rank: int, top_ids, top_logprobs) -> dict[int, Logprob]:
    """{token_id: Logprob} with the top-N tokens (ranks 1..N) and the sampled/actual token."""
    entry = {t: Logprob(v, r + 1, engine._decode_token(t))
             for r, (t, v) in enumerate(zip(top_ids or (), top_logprobs or ()))}
    entry.setdefault(token, Logprob(logprob, rank, engine._decode_token(token)))
    return entry


def add_prompt_logprobs(engine, request: Request, start: int, logits: torch.Tensor) -> None:
    """Logits after positions start..start+n-1 score prompt tokens start+1..start+n."""
    prompt = request.prompt_token_ids
    if request.prompt_logprobs is None:
        request.prompt_logprobs = [None]
    first = len(request.prompt_logprobs)          # next prompt position without a logprob
    last = min(start + logits.shape[0], len(prompt) - 1)
    if last < first or first <= start:
        return
    ids = prompt[first:last + 1]
    lps, ranks, top_ids, top_lps = compute_logprobs(
        logits[first - 1 - start:last - start], torch.tensor(ids, device=logits.device),
        request.params.prompt_logprobs)
    for token, lp, rank, ti, tl in zip(ids, lps, ranks, top_ids, top_lps):
        request.prompt_logprobs.append(build_logprobs(engine, token, lp, rank, ti, tl))


def _visible_text(seq: Sequence) -> str:
    detok = seq.detokenizer
    if detok is None:
        return ""
    text, hold = detok.text, detok.holdback
    return text[:len(text) - hold] if hold and not seq.finished else text


def build_output(engine, request: Request, force: bool = False) -> RequestOutput | None:
    """The output for this step (None: FINAL_ONLY and not finished yet, unless ``force``)."""
    params = request.params
    kind = params.output_kind
    finished = request.finished
    if kind is RequestOutputKind.FINAL_ONLY and not finished and not force:
        return None
    delta = kind is RequestOutputKind.DELTA
    want_logprobs = params.logprobs is not None
    completions = []
    for seq in request.seqs:
        cumulative = seq.cumulative_logprob if want_logprobs else None
        num_prompt, seq_finished = seq.num_prompt_tokens, seq.status is SequenceStatus.FINISHED
        if delta:
            start = seq.num_sent_tokens
            total = len(seq.token_ids) - num_prompt
            detok = seq.detokenizer
            text = "" if detok is None else detok.get_next_delta(seq_finished)
            if start == total and not text and (seq.finish_sent or not seq_finished):
                continue
            ids = seq.token_ids[num_prompt + start:]
            logprobs = seq.step_logprobs[start:] if want_logprobs else None
            seq.num_sent_tokens = total
            seq.finish_sent = seq_finished
        else:
            text, ids = _visible_text(seq), seq.token_ids[num_prompt:]
            logprobs = list(seq.step_logprobs) if want_logprobs else None
        completions.append(CompletionOutput(seq.sample_index, text, ids, cumulative, logprobs,
                                            seq.finish_reason, seq.stop_reason))
    prompt_logprobs = request.prompt_logprobs
    if delta and prompt_logprobs is not None:   # sent once, with the first delta after they are done
        if request.needs_prompt_logprobs or request.prompt_logprobs_sent:
            prompt_logprobs = None
        else:
            request.prompt_logprobs_sent = True
    return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, completions,
                         finished, request.metrics, request.num_cached_tokens, prompt_logprobs)
