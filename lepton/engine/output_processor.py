"""The output processor: the engine core's tokens -> what callers see.

    processor.add_request(request, sink)       # sink: where this request's outputs go (None: step())
    stopped = processor.process(core_output)   # detokenize, stop strings, logprobs, metrics
    core.finish_stopped(stopped)               # the sequences a stop string ended
    for out, sink in processor.outputs(): ...  # one RequestOutput per request that progressed

Per sequence it keeps the text (an IncrementalDetokenizer, when text is needed while the
sequence runs: streamed outputs or stop strings; otherwise the text is decoded once, at the
end), the logprob entries and what DELTA outputs already sent. RequestOutputs are cumulative,
delta or final-only as SamplingParams.output_kind says. While a sequence runs, the last
max(len(stop)) - 1 characters of its text are held back from cumulative and delta outputs
alike, so a stop string that is still forming is never shown; the final output has everything.
Hence the streamed deltas of every request concatenate to its final text.

Logprob entries name tokens by text: the sampled (or prompt) token by its piece, the text it
added to the output (detokenizer.py), so the pieces concatenate to the text; the alternatives
by the text they would have added at that point. A DELTA output of a request with logprobs
carries the tokens whose pieces are settled (final and within the text handed out): with stop
strings, or a character split across tokens, a token follows its text by a step or a few.
Without logprobs every new token goes out in the step that made it.

Metrics per request: first token time, inter-token latencies of the first sample, last token
and finish times (the core stamps arrival, scheduling and preemptions).
"""

from __future__ import annotations

import time

from lepton.engine.core import CoreOutput
from lepton.engine.detokenizer import IncrementalDetokenizer
from lepton.engine.logprobs import continuations, logprob_entry, name_prompt_tokens, name_tokens, prompt_entries
from lepton.engine.sequence import Request, Sequence
from lepton.outputs import CompletionOutput, Logprob, RequestOutput
from lepton.sampling_params import RequestOutputKind


class SampleState:
    """Output state of one sequence (sample) of a request."""

    __slots__ = ("seq", "detokenizer", "logprobs", "cumulative_logprob", "num_sent_tokens",
                 "num_named", "finish_sent", "stop_str")

    def __init__(self, seq: Sequence, detokenizer: IncrementalDetokenizer | None):
        self.seq = seq
        self.detokenizer = detokenizer
        self.logprobs: list[dict[int, Logprob]] = []
        self.cumulative_logprob = 0.0
        self.num_sent_tokens = 0       # output tokens already reported (DELTA outputs)
        self.num_named = 0             # sampled logprob entries named by their final piece
        self.finish_sent = False       # the finish reason was reported (DELTA outputs)
        self.stop_str: str | None = None


class RequestState:
    __slots__ = ("request", "sink", "final_only", "samples", "prompt_logprobs", "prompt_logprobs_sent", "done")

    def __init__(self, request: Request, sink):
        self.request = request
        self.sink = sink
        self.final_only = request.params.output_kind is RequestOutputKind.FINAL_ONLY
        self.samples: dict[int, SampleState] = {}
        self.prompt_logprobs: list | None = None   # None for position 0, then {id: Logprob}
        self.prompt_logprobs_sent = False          # DELTA outputs carry them once
        self.done = False


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._states: dict[str, RequestState] = {}
        self._touched: dict[str, RequestState] = {}

    def add_request(self, request: Request, sink=None) -> None:
        """Follow ``request``; its outputs go to ``sink(output)`` (None: returned by outputs())."""
        self._states[request.request_id] = RequestState(request, sink)

    def decode_token(self, token_id: int) -> str:
        return str(token_id) if self.tokenizer is None else self.tokenizer.decode([token_id])

    # ---- one step ---------------------------------------------------------------------------------
    def process(self, core_output: CoreOutput) -> list[tuple[Sequence, str]]:
        """Take in one step's tokens; returns the sequences a stop string ended (for the core)."""
        now = time.monotonic()
        stopped = []
        for chunk in core_output.prompt_logprobs:
            request = chunk.request
            state = self._states.get(request.request_id)
            if state is None:
                continue
            if state.prompt_logprobs is None:
                state.prompt_logprobs = [None]
            state.prompt_logprobs += prompt_entries(self.tokenizer, request.prompt_token_ids, chunk.first,
                                                    chunk.token_ids, chunk.stats)
            if not request.needs_prompt_logprobs:   # all positions in: name the prompt's tokens
                name_prompt_tokens(self.tokenizer, state.prompt_logprobs, request.prompt_token_ids,
                                   request.params.skip_special_tokens)
            self._touched[request.request_id] = state
        states, touched = self._states, self._touched
        for sampled in core_output.sampled:
            seq = sampled.seq
            request = seq.request
            state = states.get(request.request_id)
            if state is None:
                continue
            # A final-only request is built once, when it finishes (the common offline case).
            if not state.final_only or seq.finish_reason is not None:
                touched[request.request_id] = state
            sample = state.samples.get(seq.sample_index)
            if sample is None:
                sample = state.samples[seq.sample_index] = SampleState(seq, self._step_detokenizer(request))
            if sampled.token_id is None:
                continue
            metrics = request.metrics
            if metrics.first_token_time is None:
                metrics.first_token_time = now
            elif seq.sample_index == 0:
                metrics.inter_token_latencies.append(now - metrics.last_token_time)
            metrics.last_token_time = now
            if sampled.logprob is not None:
                sample.cumulative_logprob += sampled.logprob
                sample.logprobs.append(self._sampled_entry(sampled, sample.detokenizer))
            params = seq.request.params
            if sample.detokenizer is not None and not (sampled.stopped_by_token
                                                       and not params.include_stop_str_in_output):
                checking = len(seq.token_ids) - seq.num_prompt_tokens >= params.min_tokens
                sample.stop_str = sample.detokenizer.update([sampled.token_id], check_stop=checking)
                if sample.stop_str is not None:
                    stopped.append((seq, sample.stop_str))
                    touched[request.request_id] = state
        return stopped

    def _step_detokenizer(self, request: Request) -> IncrementalDetokenizer | None:
        # Text is needed every step only when it is streamed, searched for stop strings or names
        # logprobs; otherwise it is decoded once, when the sequence ends (see _final_text).
        params = request.params
        if self.tokenizer is None or not (params.stop or params.logprobs is not None
                                          or params.output_kind is not RequestOutputKind.FINAL_ONLY):
            return None
        return self._detokenizer(request)

    def _detokenizer(self, request: Request) -> IncrementalDetokenizer:
        params = request.params
        return IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids,
                                      skip_special_tokens=params.skip_special_tokens, stop=params.stop,
                                      include_stop_str_in_output=params.include_stop_str_in_output)

    def _sampled_entry(self, sampled, detok: IncrementalDetokenizer | None) -> dict[int, Logprob]:
        """The sampled token's entry; each token named by the text it would add next (the sampled
        one's name becomes its piece once that is settled, _named)."""
        ids = [*(sampled.top_ids or ()), sampled.token_id]
        names = (continuations(self.tokenizer, [(*detok.context, ids)])[0] if detok is not None
                 else [self.decode_token(t) for t in ids])
        return logprob_entry(sampled.token_id, sampled.logprob, sampled.rank, sampled.top_ids,
                             sampled.top_logprobs, names)

    # ---- outputs -----------------------------------------------------------------------------------
    def outputs(self) -> list[tuple[RequestOutput, object]]:
        """(output, sink) of every request that progressed since the last call."""
        touched, self._touched = self._touched, {}
        out = []
        now = time.monotonic()
        for rid, state in touched.items():
            request = state.request
            if request.finished:
                self._finish(state, now)
            output = self._build(state)
            if output is not None:
                out.append((output, state.sink))
        return out

    def abort(self, request: Request) -> tuple[RequestOutput, object] | None:
        """The final output of an aborted request (and its sink); None if it is not followed."""
        state = self._states.get(request.request_id)
        if state is None:
            return None
        self._touched.pop(request.request_id, None)
        self._finish(state, time.monotonic())
        return self._build(state, force=True), state.sink

    def _finish(self, state: RequestState, now: float) -> None:
        self._states.pop(state.request.request_id, None)
        if state.done:
            return
        state.done = True
        state.request.metrics.finished_time = now
        for seq in state.request.seqs:
            sample = state.samples.get(seq.sample_index)
            if sample is None:
                sample = state.samples[seq.sample_index] = SampleState(seq, None)
            self._final_text(sample)

    def _final_text(self, sample: SampleState) -> None:
        """Flush the sequence's text (decoding it all now if it was not followed step by step)."""
        if self.tokenizer is None:
            return
        seq = sample.seq
        if sample.detokenizer is None:
            sample.detokenizer = self._detokenizer(seq.request)
            ids = seq.token_ids[seq.num_prompt_tokens:]
            if ids and seq.finish_reason == "stop" and sample.stop_str is None and \
                    not seq.request.params.include_stop_str_in_output:
                ids = ids[:-1]   # the eos / stop token: its text is not output (as in vLLM)
            sample.detokenizer.update(ids)
        sample.detokenizer.finish()

    def _build(self, state: RequestState, force: bool = False) -> RequestOutput | None:
        """The output for this step (None: FINAL_ONLY and not finished yet, or DELTA with nothing
        new, as when a token waits for the rest of its character; unless ``force``)."""
        request = state.request
        params = request.params
        finished = request.finished
        kind = params.output_kind
        if kind is RequestOutputKind.FINAL_ONLY and not finished and not force:
            return None
        delta = kind is RequestOutputKind.DELTA
        completions = [c for c in (self._completion(state, seq, delta) for seq in request.seqs) if c is not None]
        if delta and not completions and not finished and not force:
            return None
        prompt_logprobs = state.prompt_logprobs
        if delta and prompt_logprobs is not None:   # sent once, with the first delta after they are done
            if request.needs_prompt_logprobs or state.prompt_logprobs_sent:
                prompt_logprobs = None
            else:
                state.prompt_logprobs_sent = True
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, completions,
                             finished, request.metrics, request.num_cached_tokens, prompt_logprobs)

    def _completion(self, state: RequestState, seq: Sequence, delta: bool) -> CompletionOutput | None:
        sample = state.samples.get(seq.sample_index)
        if sample is None:
            sample = state.samples[seq.sample_index] = SampleState(seq, self._step_detokenizer(seq.request))
        want_logprobs = seq.request.params.logprobs is not None
        cumulative = sample.cumulative_logprob if want_logprobs else None
        num_prompt, seq_finished = seq.num_prompt_tokens, seq.finished
        reason, stop_reason = seq.finish_reason, seq.stop_reason
        if sample.stop_str is not None:   # a stop string outranks the length limit hit with it
            reason, stop_reason = "stop", sample.stop_str
        detok = sample.detokenizer
        total = len(seq.token_ids) - num_prompt
        if detok is not None and seq_finished:
            detok.finish()   # a sample may end before its request: its text is final now
        if delta:
            start = sample.num_sent_tokens
            text = "" if detok is None else detok.get_next_delta(seq_finished)
            # Tokens go out with the text they settled into only when their logprobs name them by
            # it; otherwise each one goes out at once, so a stream gets an event every step even
            # while a character split across tokens (or a possible stop string) holds its text back.
            settled = (self._settled(detok, total, seq_finished, detok.num_sent_chars if detok else 0)
                       if want_logprobs else total)
            if start == settled and not text and (sample.finish_sent or not seq_finished):
                return None
            ids = seq.token_ids[num_prompt + start:num_prompt + settled]
            logprobs = self._named(sample, settled)[start:settled] if want_logprobs else None
            sample.num_sent_tokens, sample.finish_sent = settled, seq_finished
        else:
            text = "" if detok is None else detok.text
            hold = 0 if detok is None or seq_finished else detok.holdback
            text = text[:len(text) - hold] if hold else text
            if want_logprobs:
                self._named(sample, self._settled(detok, total, seq_finished, len(text)))
            ids, logprobs = seq.token_ids[num_prompt:], (list(sample.logprobs) if want_logprobs else None)
        return CompletionOutput(seq.sample_index, text, ids, cumulative, logprobs, reason, stop_reason)

    @staticmethod
    def _settled(detok: IncrementalDetokenizer | None, total: int, finished: bool, shown: int) -> int:
        """Output tokens whose pieces are final within the ``shown`` characters of the text."""
        if detok is None or finished or detok.stopped:
            return total
        return min(total, detok.settled(shown))

    @staticmethod
    def _named(sample: SampleState, settled: int) -> list[dict[int, Logprob]]:
        """Name the sampled tokens up to ``settled`` by their pieces; returns the entries."""
        entries, detok, start = sample.logprobs, sample.detokenizer, sample.num_named
        if detok is not None and settled > start:
            seq = sample.seq
            tokens = seq.token_ids[seq.num_prompt_tokens + start:seq.num_prompt_tokens + settled]
            name_tokens(entries[start:settled], tokens, detok.pieces(start, settled))
            sample.num_named = settled
        return entries
