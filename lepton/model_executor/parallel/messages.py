"""The step channel from the driver (rank 0) to its workers: torch.distributed broadcasts of
tensors, never pickled objects.

Every message is a fixed-layout header, HEADER_LEN int64 values [op, a, b, c, d, e, f, g], and,
where the header says so, one int64 payload whose length the header fixes:

    EXECUTE      a=B seqs, b=W block-table width, c=T tokens, d=R logits rows, e=P block copies
                 payload = query_lens[B] | seq_lens[B] | block_tables[B*W] | slot_mapping[T] |
                           input_ids[T] | positions[T] | logit_rows[R] | block_copies[2P]
    ENCODE       a=B seqs, c=T tokens; payload = lens[B] | token ids[T]  (whole sequences, no cache)
    LOGITS       a=N rows; then hidden [N, H] in the model dtype, on the device group (tasks.py
                 calls compute_logits outside a step; the workers must join its gather)
    PLAN_KV      a=max_model_len; every rank sizes its cache, an all-reduce MIN follows
    ALLOCATE_KV  a=num_blocks, b=max_model_len
    SHUTDOWN     the workers leave their loop

Two broadcasts per step on the gloo group: host tensors (scheduling data lives on the host).
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch
import torch.distributed as dist

from lepton.model_executor.model_runner import StepArrays
from lepton.model_executor.parallel.state import get_state

HEADER_LEN = 8


class Op(IntEnum):
    EXECUTE = 1
    ENCODE = 2
    LOGITS = 3
    PLAN_KV = 4
    ALLOCATE_KV = 5
    SHUTDOWN = 6


def _broadcast(tensor: torch.Tensor) -> torch.Tensor:
    dist.broadcast(tensor, src=0, group=get_state().cpu_group)
    return tensor


def send(op: Op, *args: int, payload: np.ndarray | None = None) -> None:
    """(Driver.) Broadcast a header, then the payload its numbers announce."""
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[0] = int(op)
    header[1:1 + len(args)] = torch.tensor(args, dtype=torch.int64)
    _broadcast(header)
    if payload is not None and payload.size:
        _broadcast(torch.from_numpy(np.ascontiguousarray(payload, dtype=np.int64)))


def receive_header() -> tuple[Op, list[int]]:
    """(Worker.) Wait for the driver's next message."""
    header = _broadcast(torch.empty(HEADER_LEN, dtype=torch.int64)).tolist()
    return Op(header[0]), header[1:]


def receive_payload(length: int) -> np.ndarray:
    if length == 0:
        return np.zeros(0, dtype=np.int64)
    return _broadcast(torch.empty(length, dtype=torch.int64)).numpy()


def send_step(arrays: StepArrays, block_copies: list[tuple[int, int]]) -> None:
    b, w = arrays.block_tables.shape
    copies = np.asarray(block_copies, dtype=np.int64).reshape(-1)
    payload = np.concatenate([arrays.query_lens, arrays.seq_lens, arrays.block_tables.reshape(-1),
                              arrays.slot_mapping, arrays.input_ids, arrays.positions, arrays.logit_rows, copies])
    send(Op.EXECUTE, b, w, len(arrays.input_ids), len(arrays.logit_rows), len(block_copies), payload=payload)


def receive_step(args: list[int]) -> tuple[StepArrays, list[tuple[int, int]]]:
    """The arrays of an EXECUTE header's payload (the layout of send_step)."""
    b, w, t, r, p = args[:5]
    data = receive_payload(2 * b + b * w + 3 * t + r + 2 * p)
    sizes = [b, b, b * w, t, t, t, r, 2 * p]
    parts = np.split(data, np.cumsum(sizes)[:-1])
    arrays = StepArrays(parts[0], parts[1], parts[2].reshape(b, w).astype(np.int32), *parts[3:7])
    return arrays, [(int(s), int(d)) for s, d in parts[7].reshape(-1, 2)]


def send_encode(token_ids: list[list[int]]) -> None:
    lens = [len(t) for t in token_ids]
    flat = np.fromiter((t for ids in token_ids for t in ids), np.int64, sum(lens))
    send(Op.ENCODE, len(lens), 0, len(flat), payload=np.concatenate([np.asarray(lens, np.int64), flat]))


def receive_encode(args: list[int]) -> list[list[int]]:
    b, t = args[0], args[2]
    data = receive_payload(b + t)
    bounds = np.cumsum(data[:b])[:-1]
    return [part.tolist() for part in np.split(data[b:], bounds)]


def broadcast_hidden(hidden: torch.Tensor) -> torch.Tensor:
    """LOGITS' second half: the hidden rows, on the device group (NCCL on CUDA)."""
    dist.broadcast(hidden, src=0, group=get_state().device_group)
    return hidden


def min_over_ranks(value: int) -> int:
    """The smallest of every rank's ``value`` (the KV cache: the tightest rank decides)."""
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=get_state().cpu_group)
    return int(t.item())
