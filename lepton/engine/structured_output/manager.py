"""Structured outputs in the engine core: grammars compile while their requests wait, and every
step's sampled sequences get one bitmask row each from their grammar matcher.

    structured.hold(seq)                  # a new request with structured_outputs: compile first
    ready, failed = structured.release()  # compiled ones go to the scheduler's queue
    mask = structured.bitmask(sample_seqs)          # this step's (bitmask [C, W], rows [C])
    structured.accept(sampled)            # each sampled token advances its sequence's matcher

A request waits here, outside the scheduler, until its grammar is compiled: the running batch
never waits for a compilation. Each sequence has its own matcher (the n samples of a request
fork apart after the prompt), made on its first sampling from the compiled grammar, replaying
the sequence's output tokens: so a sequence sampled again after a preemption (its tokens are
kept; only its cache is recomputed) or forked continues from exactly its tokens. A matcher
advances only with tokens the core keeps, after the step succeeded, so it never needs to roll
back.
"""

from __future__ import annotations

import logging
from concurrent.futures import FIRST_COMPLETED, wait

import numpy as np

logger = logging.getLogger(__name__)

WAIT_WHEN_IDLE_S = 0.05   # how long an idle step waits for a compilation before it returns


class StructuredOutputManager:
    def __init__(self, make_compiler=None):
        """``make_compiler()`` -> GrammarCompiler, called on the first structured request (None:
        structured outputs are refused: the model has no tokenizer)."""
        self._make_compiler = make_compiler
        self._compiler = None
        self._batch_matcher = None
        self.pending: list = []   # first sequences of requests whose grammar is compiling

    @property
    def compiler(self):
        if self._compiler is None:
            if self._make_compiler is None:
                raise ValueError("structured outputs need the model's tokenizer")
            self._compiler = self._make_compiler()
        return self._compiler

    # ---- requests waiting for their grammar ---------------------------------------------------------
    def hold(self, seq) -> None:
        """Start compiling the grammar of ``seq``'s request; the sequence waits here meanwhile."""
        request = seq.request
        request.grammar = self.compiler.submit(request.params.structured_outputs)
        self.pending.append(seq)

    def release(self, idle: bool = False) -> tuple[list, list]:
        """(sequences whose grammar is ready, sequences whose compilation failed), in arrival
        order; aborted requests are dropped. ``idle``: nothing else can run, so wait a little
        for the first compilation rather than return at once."""
        if not self.pending:
            return [], []
        if idle:
            wait([s.request.grammar for s in self.pending], timeout=WAIT_WHEN_IDLE_S, return_when=FIRST_COMPLETED)
        ready, failed, still = [], [], []
        for seq in self.pending:
            future = seq.request.grammar
            if seq.request.aborted:
                continue
            if not future.done():
                still.append(seq)
            elif future.exception() is not None:
                logger.error("grammar compilation failed for request %s: %s", seq.request.request_id,
                             future.exception())
                failed.append(seq)
            else:
                ready.append(seq)
        self.pending = still
        return ready, failed

    # ---- the step's mask ----------------------------------------------------------------------------
    def bitmask(self, seqs) -> tuple[np.ndarray, np.ndarray] | None:
        """For the sampled sequences ``seqs`` (row b = seqs[b]): (bitmask [C, W] int32, rows [C]
        int64) of the C constrained ones, in row order (see bitmask.py for what a bit means);
        None when no row is constrained."""
        rows = [b for b, seq in enumerate(seqs) if seq.request.grammar is not None]
        if not rows:
            return None
        import xgrammar as xgr

        matchers = [self._matcher(seqs[b]) for b in rows]
        words = -(-self.compiler.vocab_size // 32)
        mask = np.full((len(rows), words), -1, dtype=np.int32)
        live = [i for i, m in enumerate(matchers) if not m.is_terminated()]
        if live:
            if self._batch_matcher is None:
                self._batch_matcher = xgr.BatchGrammarMatcher()
            self._batch_matcher.batch_fill_next_token_bitmask([matchers[i] for i in live], mask, live)
        return mask, np.array(rows, dtype=np.int64)

    def _matcher(self, seq):
        if seq.matcher is None:
            import xgrammar as xgr

            matcher = xgr.GrammarMatcher(seq.request.grammar.result())
            for token in seq.output_token_ids:
                if not matcher.accept_token(token):
                    break
            seq.matcher = matcher
        return seq.matcher

    def accept(self, sampled) -> None:
        """Advance each constrained sequence's matcher by its new token (SampledTokens)."""
        for s in sampled:
            matcher = s.seq.matcher
            if matcher is None or s.token_id is None or matcher.is_terminated():
                continue
            if not matcher.accept_token(s.token_id):
                logger.warning("request %s: token %d does not follow its grammar", s.seq.request.request_id,
                               s.token_id)

    def shutdown(self) -> None:
        if self._compiler is not None:
            self._compiler.shutdown()
