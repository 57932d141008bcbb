"""Checkpoint-name -> parameter mapping shared by the models.

A model lists, for every tensor name of its Hugging Face checkpoint, where the tensor goes: a
parameter, or a row range of a fused parameter (q/k/v -> qkv_proj), optionally transposed
(GPT-2's Conv1D stores [in, out]). ``WeightMap.load`` copies tensors in (cast to the
parameter's dtype and device by ``copy_``), and ``check_loaded`` names whatever is still missing.

Under tensor parallelism a target also carries its :class:`Shard` (parallel/layers.py): the part
of the checkpoint tensor this rank keeps. The sharded loader reads only that part (``shard_of``);
a whole tensor from any other source is cut here. ``skip`` names tensors this rank does not hold
at all (a row-parallel bias lives on rank 0 only).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import torch

from lepton.model_executor.layers.linear import materialize
from lepton.model_executor.parallel.layers import ColumnParallelLinear, RowParallelLinear, Shard


def require_config(config: dict, architecture: str, *keys: str) -> None:
    """ValueError naming the config.json keys ``architecture`` needs but ``config`` lacks."""
    missing = [k for k in keys if config.get(k) is None]
    if missing:
        raise ValueError(f"config.json of this {architecture} checkpoint lacks {', '.join(missing)}")


@dataclass
class _Target:
    param: torch.Tensor
    rows: slice | None = None      # None: the whole parameter
    transpose: bool = False
    shard: Shard | None = None     # this rank's part of the checkpoint tensor (tensor parallel)


class WeightMap:
    """Expected HF tensor names of one model and where each one goes.

    ``prefixes``: optional leading parts of checkpoint names (``"model."``, ``"transformer."``)
    that checkpoints of the bare base model lack; a name is looked up as given, then with each
    prefix prepended. ``ignore``: regexes of buffers saved by some checkpoints that carry no
    weights (rotary inv_freq, GPT-2's attention masks). ``renames``: (regex, replacement) pairs
    applied in turn to a name before that lookup, for other spellings of the same tensor (a task
    wrapper's ``bert.`` prefix, TensorFlow's LayerNorm ``gamma`` / ``beta``); errors still quote
    the name as the checkpoint gives it.
    """

    def __init__(self, prefixes: tuple[str, ...] = (), ignore: tuple[str, ...] = (),
                 renames: tuple[tuple[str, str], ...] = ()):
        self.prefixes = prefixes
        self.ignore = [re.compile(p) for p in ignore]
        self.renames = [(re.compile(p), replacement) for p, replacement in renames]
        self.targets: dict[str, _Target] = {}
        self.optional: set[str] = set()
        self.loaded: set[str] = set()

    def add(self, name: str, param: torch.Tensor, rows: slice | None = None, transpose: bool = False,
            optional: bool = False, shard: Shard | None = None) -> None:
        """``optional``: load it when present, don't require it (a tied lm_head saved anyway)."""
        self.targets[name] = _Target(param, rows, transpose, shard)
        if optional:
            self.optional.add(name)

    def skip(self, name: str) -> None:
        """A checkpoint tensor this rank does not keep: consumed, never copied, not required."""
        self.targets[name] = _Target(None)
        self.optional.add(name)

    def shard_of(self, name: str) -> Shard | None | bool:
        """What a sharded reader should read of checkpoint tensor ``name``: its Shard, None for
        all of it, False for nothing (a skipped tensor; unknown names are read whole, so that
        load() reports them)."""
        key = self.resolve(name)
        if key is None:
            return None
        target = self.targets[key]
        return False if target.param is None else target.shard

    def expected_names(self) -> set[str]:
        return set(self.targets) - self.optional

    def resolve(self, name: str) -> str | None:
        """The target key of checkpoint name ``name`` (its renames, then its prefixes), or None."""
        for pattern, replacement in self.renames:
            name = pattern.sub(replacement, name)
        for candidate in (name, *(p + name for p in self.prefixes)):
            if candidate in self.targets:
                return candidate
        return None

    def load(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy each (hf_name, tensor) into its parameter; returns the checkpoint names consumed."""
        consumed, unexpected = set(), []
        for name, tensor in weights:
            key = self.resolve(name)
            if key is None:
                if not any(p.search(name) for p in self.ignore):
                    unexpected.append(name)
                continue
            if self.targets[key].param is not None:
                self._copy(name, self.targets[key], tensor)
            self.loaded.add(key)
            consumed.add(name)
        if unexpected:
            shown = ", ".join(sorted(unexpected)[:10]) + (" ..." if len(unexpected) > 10 else "")
            raise ValueError(f"checkpoint has {len(unexpected)} tensor(s) this model does not use: {shown}")
        return consumed

    @staticmethod
    def _copy(name: str, target: _Target, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise ValueError(f"checkpoint tensor {name!r} must be a floating-point tensor, got "
                             f"{getattr(tensor, 'dtype', type(tensor).__name__)}")
        shard = target.shard
        if shard is not None and tensor.dim() > shard.dim and tensor.shape[shard.dim] == shard.full:
            tensor = shard.take(tensor)   # a whole tensor (not read through shard_of): cut it here
        if target.transpose:
            tensor = tensor.t()
        materialize(target.param)   # a deferred Linear weight gets its storage now
        dest = target.param.data if target.rows is None else target.param.data[target.rows]
        if tuple(tensor.shape) != tuple(dest.shape):
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(dest.shape)} (config.json does not match the weights?)")
        with torch.no_grad():
            dest.copy_(tensor)

    def missing(self) -> list[str]:
        return sorted(self.expected_names() - self.loaded)

    def check_loaded(self) -> None:
        """ValueError naming the checkpoint tensors that never arrived."""
        missing = self.missing()
        if missing:
            shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise ValueError(f"checkpoint is missing {len(missing)} tensor(s): {shown}")


def map_linear(wm: WeightMap, name: str, layer, part: int | None = None, transpose: bool = False,
               bias: bool = False) -> None:
    """Map checkpoint ``name``.weight (and ``name``.bias when ``bias``) into ``layer``: into the
    rows of fused part ``part`` when given, with this rank's Shard under tensor parallelism."""
    rows = None if part is None else layer.part_rows(part)
    shard = None
    if isinstance(layer, ColumnParallelLinear):
        shard = layer.shard(part, transpose)
    elif isinstance(layer, RowParallelLinear):
        shard = layer.shard(transpose)
    wm.add(f"{name}.weight", layer.weight, rows, transpose=transpose, shard=shard)
    if not bias:
        return
    if layer.bias is None:   # a row-parallel bias: rank 0 adds it once, after the all-reduce
        wm.skip(f"{name}.bias")
    else:
        bias_shard = None if shard is None or isinstance(layer, RowParallelLinear) else (
            layer.shard(part, transpose=False))
        wm.add(f"{name}.bias", layer.bias, rows, shard=bias_shard)


class MappedWeights:
    """Mixin for models that describe their checkpoint with a :class:`WeightMap` in
    ``self.weight_map``: the loader-facing methods of the model contract."""

    weight_map: WeightMap | None   # None once the weights were prepacked (layers/linear.py)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if self.weight_map is None:
            raise RuntimeError("this model's weights were prepacked for the CPU; load into a new model")
        return self.weight_map.load(weights)

    def expected_weight_names(self) -> set[str]:
        return self.weight_map.expected_names()

    def check_loaded(self) -> None:
        self.weight_map.check_loaded()
