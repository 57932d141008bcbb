"""Sharded layers (Megatron-LM's tensor parallelism, Shoeybi et al. 2019), for ws ranks.

    column parallel  y = x W^T, W [out, in] split along out: rank r computes y[:, out_r] from the
                     whole x; nothing to communicate (qkv, gate_up, GPT-2's c_attn and c_fc).
    row parallel     y = x W^T + b, W split along in: rank r holds W[:, in_r] and the matching
                     slice x[:, in_r] (which the column-parallel layer before it produced), so
                     y = sum_r x_r W_r^T + b. The sum is one all-reduce after the matmul; the bias
                     lives on rank 0 only, so it is added once (o_proj, down_proj, c_proj).
    vocab parallel   the embedding [V, H] split along V in ceil(V/ws) rows per rank: a rank looks
                     up the ids it owns, zeros the rest, and an all-reduce sums the rows; the LM
                     head's logits [N, V/ws] are gathered on rank 0 (parallel/state.py).

Attention heads follow the column split: rank r runs query heads [r*Hq/ws, (r+1)*Hq/ws) and the
KV heads they read. With Hk >= ws the KV heads split the same way; with Hk < ws (ws a multiple
of Hk) each rank holds the one KV head of its query heads, replicated on ws/Hk ranks.

A :class:`Shard` says which part of a checkpoint tensor a rank keeps, so the loader reads only
that part (safetensors' get_slice) and per-rank weight memory is about 1/ws. With one rank the
factories return plain :class:`Linear` layers: an unsharded model runs exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lepton.model_executor.layers.linear import Linear
from lepton.model_executor.parallel.state import all_reduce, gather_vocab, tp_rank, tp_size


@dataclass(frozen=True)
class Shard:
    """Ranges along ``dim`` of a checkpoint tensor (in the file's own layout, before any
    transpose), concatenated: this rank's part. ``full``: the tensor's size along ``dim``."""

    dim: int
    full: int
    ranges: tuple[tuple[int, int], ...]

    @property
    def size(self) -> int:
        return sum(stop - start for start, stop in self.ranges)

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of the whole tensor (a view when it is one range)."""
        parts = [tensor.narrow(self.dim, start, stop - start) for start, stop in self.ranges]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)

    def read(self, handle_slice) -> torch.Tensor:
        """This rank's part, read from a safetensors slice without loading the rest."""
        index = (lambda a, b: handle_slice[a:b]) if self.dim == 0 else (lambda a, b: handle_slice[:, a:b])
        parts = [index(start, stop) for start, stop in self.ranges]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)


def split_evenly(n: int, what: str) -> tuple[int, int]:
    """(start, length) of this rank's equal share of ``n``; ValueError when ws does not divide it."""
    size = tp_size()
    if n % size:
        raise ValueError(f"tensor_parallel_size={size} must divide {what} ({n})")
    return tp_rank() * (n // size), n // size


def kv_head_shard(num_heads: int, num_kv_heads: int) -> tuple[int, int]:
    """(first KV head, count) this rank holds: split when Hk >= ws, else the one KV head its query
    heads read (query head h reads KV head h // (Hq/Hk); rank r's heads all read r*Hk // ws)."""
    size, rank = tp_size(), tp_rank()
    split_evenly(num_heads, "num_attention_heads")
    if num_kv_heads >= size:
        return split_evenly(num_kv_heads, "num_key_value_heads")
    if size % num_kv_heads:
        raise ValueError(f"with fewer KV heads ({num_kv_heads}) than ranks, tensor_parallel_size={size} "
                         "must be a multiple of num_key_value_heads (each KV head is replicated)")
    return rank * num_kv_heads // size, 1


class ColumnParallelLinear(Linear):
    """A fused Linear whose part i keeps rows [start_i, start_i + len_i) of the whole part i
    (``part_ranges``); ``output_sizes`` are the local lengths, so part_rows() stays local."""

    def __init__(self, in_features: int, full_sizes: list[int], part_ranges: list[tuple[int, int]],
                 bias: bool, dtype, device):
        super().__init__(in_features, [n for _, n in part_ranges], bias, dtype, device)
        self.full_sizes, self.part_ranges = list(full_sizes), list(part_ranges)

    def shard(self, part: int | None = None, transpose: bool = False) -> Shard:
        """The checkpoint rows of part ``part`` (its own tensor), or of the whole fused tensor
        (part None: GPT-2's c_attn holds q|k|v in one tensor). ``transpose``: stored [in, out]."""
        dim = 1 if transpose else 0
        if part is not None:
            start, n = self.part_ranges[part]
            return Shard(dim, self.full_sizes[part], ((start, start + n),))
        ranges, offset = [], 0
        for full, (start, n) in zip(self.full_sizes, self.part_ranges):
            ranges.append((offset + start, offset + start + n))
            offset += full
        return Shard(dim, offset, tuple(ranges))


class RowParallelLinear(Linear):
    """y = all_reduce(x_r W_r^T) (+ b on rank 0): the input columns [start, start + n) of a
    [out, full_in] weight. ``full_in_features`` sets the int4 group (quantization_plan)."""

    def __init__(self, full_in: int, in_range: tuple[int, int], out_features: int, bias: bool, dtype, device):
        super().__init__(in_range[1], out_features, bias and tp_rank() == 0, dtype, device)
        self.full_in_features, self.in_start = full_in, in_range[0]

    def shard(self, transpose: bool = False) -> Shard:
        dim = 0 if transpose else 1
        return Shard(dim, self.full_in_features, ((self.in_start, self.in_start + self.in_features),))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(super().forward(x))


def column_parallel_linear(in_features: int, output_sizes: list[int] | int, bias: bool, dtype, device,
                           part_ranges: list[tuple[int, int]] | None = None) -> Linear:
    """Split each output part evenly across the ranks (or as ``part_ranges`` says, e.g. KV
    heads); a plain Linear with one rank."""
    sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
    if tp_size() == 1:
        return Linear(in_features, sizes if len(sizes) > 1 else sizes[0], bias, dtype, device)
    ranges = part_ranges or [split_evenly(n, "the output size of a column-parallel layer") for n in sizes]
    return ColumnParallelLinear(in_features, sizes, ranges, bias, dtype, device)


def row_parallel_linear(in_features: int, out_features: int, bias: bool, dtype, device,
                        in_range: tuple[int, int] | None = None) -> Linear:
    """Split the inputs evenly across the ranks (or ``in_range``); a plain Linear with one rank."""
    if tp_size() == 1:
        return Linear(in_features, out_features, bias, dtype, device)
    in_range = in_range or split_evenly(in_features, "the input size of a row-parallel layer")
    return RowParallelLinear(in_features, in_range, out_features, bias, dtype, device)


class VocabParallel:
    """The vocabulary split of an embedding / LM head: rank r owns ids [start, start + count) in
    ``rows`` rows (ceil(V/ws), the last rank's tail zero padding, so every rank's logits have
    one shape for the gather). With one rank: F.embedding and the logits as they are."""

    def __init__(self, vocab_size: int):
        size, rank = tp_size(), tp_rank()
        self.vocab_size, self.sharded = vocab_size, size > 1
        self.rows = -(-vocab_size // size)
        self.start = min(vocab_size, rank * self.rows)
        self.count = min(vocab_size, self.start + self.rows) - self.start

    def parameter(self, hidden: int, dtype, device) -> torch.nn.Parameter:
        """The local [rows, hidden] weight; padding rows are zero (never loaded)."""
        weight = torch.empty(self.rows, hidden, dtype=dtype, device=device)
        weight[self.count:].zero_()
        return torch.nn.Parameter(weight, requires_grad=False)

    def shard(self) -> Shard | None:
        return Shard(0, self.vocab_size, ((self.start, self.start + self.count),)) if self.sharded else None

    def local_rows(self) -> slice | None:
        """Where the checkpoint rows go in the local weight (None: all of it)."""
        return slice(0, self.count) if self.sharded else None

    def embed(self, input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if not self.sharded:
            return F.embedding(input_ids, weight)
        local = input_ids - self.start
        foreign = (local < 0) | (local >= self.count)
        x = F.embedding(local.masked_fill(foreign, 0), weight)
        return all_reduce(x.masked_fill_(foreign[:, None], 0))

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        """[N, rows] local logits -> [N, V] on rank 0 (the shard elsewhere)."""
        return gather_vocab(logits, self.vocab_size) if self.sharded else logits
