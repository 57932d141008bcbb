"""The persistent batch: every running sequence's state in preallocated host arrays.

A sequence gets a row when it first runs (admitted, re-admitted after a preemption, or forked)
and keeps it until it leaves (finished, aborted, preempted). The rows are updated in place:
    token_ids[r, :num_tokens[r]]        prompt + output tokens (the sampled token is appended here
                                        by the runner, the step it is drawn)
    block_table[r, :num_blocks[r]]      its cache blocks (synced when the block manager grows or,
                                        after copy-on-write, swaps them)
    temperature, top_k, top_p, min_p, seeds/seeded, penalties, min_tokens, logprobs
                                        its SamplingParams as numbers, written once on join
So preparing a step is a few numpy gathers over the scheduled rows, and the sampler's
SamplingMetadata is a gather over the sampled rows: no Python loop over sequences for either
(only the few rows with logit_bias or min_tokens bans read a dict).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from lepton_kernels.sampling.noise import stream_keys

from lepton.engine.sampling_metadata import SamplingMetadata, seed_key
from lepton.engine.token_constraints import host_masks, token_masks
from lepton.model_executor.host_to_device import HostToDevice
from lepton.sampling_params import SAMPLING_EPS


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _f32(value: float) -> float:
    """A float the float32 arrays hold without overflow: huge values saturate (a temperature or
    penalty past 3.4e38 acts as its limit, infinity, either way)."""
    return min(value, _FLOAT32_MAX)


class InputBatch:
    def __init__(self, max_num_rows: int, max_model_len: int, block_size: int):
        self.max_model_len, self.block_size = max_model_len, block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.row_of: dict[int, int] = {}   # seq_id -> row
        self._allocate(max(1, max_num_rows))

    def _allocate(self, rows: int) -> None:
        def grown(old: np.ndarray | None, shape, dtype, fill):
            new = np.full(shape, fill, dtype=dtype)
            if old is not None:
                new[:old.shape[0]] = old
            return new

        old = getattr(self, "token_ids", None)
        n = 0 if old is None else old.shape[0]
        get = lambda name: getattr(self, name, None)   # noqa: E731
        self.token_ids = grown(get("token_ids"), (rows, self.max_model_len), np.int64, 0)
        self.num_tokens = grown(get("num_tokens"), rows, np.int64, 0)
        self.num_prompt_tokens = grown(get("num_prompt_tokens"), rows, np.int64, 0)
        self.block_table = grown(get("block_table"), (rows, self.max_blocks), np.int32, 0)
        self.num_blocks = grown(get("num_blocks"), rows, np.int64, 0)
        self.temperature = grown(get("temperature"), rows, np.float32, 1.0)
        self.top_k = grown(get("top_k"), rows, np.int64, 0)
        self.top_p = grown(get("top_p"), rows, np.float32, 1.0)
        self.min_p = grown(get("min_p"), rows, np.float32, 0.0)
        self.seeds = grown(get("seeds"), rows, np.int64, 0)
        self.seeded = grown(get("seeded"), rows, np.bool_, False)
        self.min_tokens = grown(get("min_tokens"), rows, np.int64, 0)
        self.ignore_eos = grown(get("ignore_eos"), rows, np.bool_, False)
        self.repetition_penalty = grown(get("repetition_penalty"), rows, np.float32, 1.0)
        self.frequency_penalty = grown(get("frequency_penalty"), rows, np.float32, 0.0)
        self.presence_penalty = grown(get("presence_penalty"), rows, np.float32, 0.0)
        self.num_logprobs = grown(get("num_logprobs"), rows, np.int64, -1)
        if old is None:
            self.stop_token_ids: dict[int, list[int]] = {}   # rows with min_tokens only
            self.logit_bias: dict[int, dict[int, float]] = {}
            # rows with allowed_token_ids or bad_words: (allowed ids or None, bad words' ids or None)
            self.constraints: dict[int, tuple[list[int] | None, list[list[int]] | None]] = {}
            self.free_rows: list[int] = []
        self.free_rows = list(range(rows - 1, n - 1, -1)) + self.free_rows

    # ---- rows join and leave ----------------------------------------------------------------
    def add(self, seq) -> int:
        """Give ``seq`` a row and write its tokens, blocks and sampling parameters."""
        if not self.free_rows:
            self._allocate(2 * self.token_ids.shape[0])
        r = self.free_rows.pop()
        self.row_of[seq.seq_id] = r
        n = len(seq.token_ids)
        self.token_ids[r, :n] = seq.token_ids
        self.num_tokens[r], self.num_prompt_tokens[r] = n, seq.num_prompt_tokens
        self.sync_block_table(r, seq.block_table)
        p = seq.request.params
        self.temperature[r], self.top_k[r], self.top_p[r], self.min_p[r] = _f32(p.temperature), max(p.top_k, 0), p.top_p, p.min_p
        self.seeded[r] = seq.seed is not None
        self.seeds[r] = seed_key(seq.seed) if seq.seed is not None else 0
        self.min_tokens[r], self.ignore_eos[r] = p.min_tokens, p.ignore_eos
        self.repetition_penalty[r] = _f32(p.repetition_penalty)
        self.frequency_penalty[r], self.presence_penalty[r] = p.frequency_penalty, p.presence_penalty
        self.num_logprobs[r] = -1 if p.logprobs is None else p.logprobs
        if p.min_tokens:
            self.stop_token_ids[r] = list(p.stop_token_ids)
        if p.logit_bias:
            self.logit_bias[r] = p.logit_bias
        if p.allowed_token_ids is not None or p.bad_words_token_ids:
            self.constraints[r] = (p.allowed_token_ids, p.bad_words_token_ids)
        return r

    def remove(self, seq_id: int) -> None:
        r = self.row_of.pop(seq_id, None)
        if r is None:
            return
        self.stop_token_ids.pop(r, None)
        self.logit_bias.pop(r, None)
        self.constraints.pop(r, None)
        self.free_rows.append(r)

    def rows(self, seqs) -> np.ndarray:
        """The rows of ``seqs`` (joining the batch first where new), in their order."""
        row_of = self.row_of
        return np.fromiter((row_of[s.seq_id] if s.seq_id in row_of else self.add(s) for s in seqs),
                           np.int64, len(seqs))

    def sync_block_table(self, r: int, table: list[int]) -> None:
        n = len(table)
        self.block_table[r, :n] = table
        self.num_blocks[r] = n

    def sync_block_tables(self, seqs, rows: np.ndarray, force: bool) -> None:
        """Copy the block tables that grew (all of them when copy-on-write swapped blocks)."""
        num_blocks = self.num_blocks
        for seq, r in zip(seqs, rows.tolist()):
            if force or len(seq.block_table) != num_blocks[r]:
                self.sync_block_table(r, seq.block_table)

    def append_tokens(self, rows: np.ndarray, tokens: np.ndarray) -> None:
        """Each sampled token joins its row's tokens (rows distinct)."""
        self.token_ids[rows, self.num_tokens[rows]] = tokens
        self.num_tokens[rows] += 1

    # ---- the sampler's view ---------------------------------------------------------------------
    def sampling_metadata(self, rows: np.ndarray, device: torch.device) -> SamplingMetadata:
        """SamplingMetadata of ``rows`` (row b of it = rows[b]), gathered from the arrays."""
        up = HostToDevice(device)
        finish = self.plan_sampling_metadata(rows, up)
        up.upload()
        return finish()

    def plan_sampling_metadata(self, rows: np.ndarray, up: HostToDevice) -> Callable[[], SamplingMetadata]:
        """sampling_metadata in two halves, so the sampler's tensors travel in the step's one
        host-to-device copy: gathers into ``up`` now, builds from the device views later."""
        temperature = self.temperature[rows]
        greedy = temperature < SAMPLING_EPS
        flags = bool(greedy.all()), not bool(greedy.any())
        fields: dict[str, int] = {"temperature": up.add(temperature)}
        extra: dict = {}
        if not flags[0] or (self.num_logprobs[rows] >= 0).any() or self._has_processors(rows):
            self._gather_sampling(rows, up, fields, extra)

        def finish() -> SamplingMetadata:
            md = SamplingMetadata(up.get(fields.pop("temperature")), *flags)
            for name, handle in fields.items():
                setattr(md, name, up.get(handle))
            if "logit_bias" in extra:
                md.logit_bias = tuple(up.get(h) for h in extra["logit_bias"])
            if "token_masks" in extra:
                md.token_masks = token_masks({k: up.get(h) for k, h in extra["token_masks"].items()})
            md.num_logprobs = extra.get("num_logprobs")
            md.all_seeded = extra.get("all_seeded", False)
            return md

        return finish

    def _gather_sampling(self, rows: np.ndarray, up: HostToDevice, fields: dict, extra: dict) -> None:
        top_k, top_p, min_p = self.top_k[rows], self.top_p[rows], self.min_p[rows]
        for name, values, on in (("top_k", top_k, top_k > 0), ("top_p", top_p, top_p < 1),
                                 ("min_p", min_p, min_p > 0)):
            if on.any():
                fields[name] = up.add(values)
        steps = self.num_tokens[rows] - self.num_prompt_tokens[rows]
        seeded = self.seeded[rows]
        banning = steps < self.min_tokens[rows]
        if seeded.any():
            fields["keys"], fields["seeded"] = up.add(np.where(seeded, stream_keys(self.seeds[rows], steps), 0)), up.add(seeded)
            extra["all_seeded"] = bool(seeded.all())
        if seeded.any() or banning.any():
            fields["steps"] = up.add(steps)
        if banning.any():
            fields["min_tokens"], fields["ignore_eos"] = up.add(self.min_tokens[rows]), up.add(self.ignore_eos[rows])
            stops = [self.stop_token_ids.get(r, []) for r in rows.tolist()]
            width = max(1, max(map(len, stops)))
            fields["stop_token_ids"] = up.add(np.array([s + [-1] * (width - len(s)) for s in stops], dtype=np.int64))
        biased = [(b, r) for b, r in enumerate(rows.tolist()) if r in self.logit_bias] if self.logit_bias else []
        if biased:
            triples = [(b, t, v) for b, r in biased for t, v in self.logit_bias[r].items()]
            b_idx, t_idx, vals = zip(*triples)
            extra["logit_bias"] = (up.add(np.array(b_idx, dtype=np.int64)), up.add(np.array(t_idx, dtype=np.int64)),
                                   up.add(np.array(vals, dtype=np.float32)))
        constrained = [(b, r) for b, r in enumerate(rows.tolist()) if r in self.constraints] if self.constraints else []
        if constrained:   # bad words look at each row's outputs so far: found here, on the host
            arrays = host_masks([(b, *self.constraints[r],
                                  self.token_ids[r, self.num_prompt_tokens[r]:self.num_tokens[r]].tolist())
                                 for b, r in constrained], len(rows))
            if arrays:
                extra["token_masks"] = {k: up.add(a) for k, a in arrays.items()}
        self._penalties(rows, up, fields)
        num_logprobs = self.num_logprobs[rows]
        if (num_logprobs >= 0).any():
            extra["num_logprobs"] = num_logprobs.tolist()

    def _has_processors(self, rows: np.ndarray) -> bool:
        return bool((self.min_tokens[rows] > self.num_tokens[rows] - self.num_prompt_tokens[rows]).any()
                    or (self.repetition_penalty[rows] != 1).any() or (self.frequency_penalty[rows] != 0).any()
                    or (self.presence_penalty[rows] != 0).any()
                    or (bool(self.logit_bias) and any(r in self.logit_bias for r in rows.tolist()))
                    or (bool(self.constraints) and any(r in self.constraints for r in rows.tolist())))

    def _penalties(self, rows: np.ndarray, up: HostToDevice, fields: dict) -> None:
        defaults = {"repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0}
        used = {name: getattr(self, name)[rows] for name in defaults}
        used = {name: v for name, v in used.items() if (v != defaults[name]).any()}
        if not used:
            return
        seq_lens = self.num_tokens[rows]
        fields["token_ids"] = up.add(self.token_ids[rows, :int(seq_lens.max())])
        fields["prompt_lens"], fields["seq_lens"] = up.add(self.num_prompt_tokens[rows]), up.add(seq_lens)
        for name, values in used.items():
            fields[name] = up.add(values)
