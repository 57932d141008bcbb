"""Repack a GPTQ / AWQ / compressed-tensors checkpoint into the model's Linear layers while its
tensors stream in.

    wrap, quantization = checkpoint_repacker(model, hf_config, quantization)
    weights = wrap(weights)

``wrap`` wraps the loader's (name, tensor) stream: a projection's quantized tensors
(``<prefix>.qweight / .qzeros / .scales / .g_idx``, or compressed-tensors'
``<prefix>.weight_packed / .weight_scale / .weight_shape / .weight_zero_point``) are held back,
and as soon as every part of a Linear has arrived (q, k and v for a fused qkv_proj) they are
converted (gptq.py, awq.py, compressed_tensors.py),
concatenated along N, prepared for the device's quant_matmul kernel, and set as the layer's
``qweight``; its float weight is freed and the model's weight map counts ``<prefix>.weight`` as
loaded. Everything else (embeddings, norms, the LM head, biases, layers the checkpoint kept in
float) passes through to the model as usual. The model's weight map says which Linear and
which part rows each ``<prefix>.weight`` is, so this works for any architecture that has one.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from lepton.model_executor.layers.linear import Linear
from lepton_kernels.ops.quant_matmul import prepare_quantized
from lepton_kernels.ops.quantize import QuantizedWeight

from . import compressed_tensors
from .awq import awq_weight
from .config import CHECKPOINT_METHODS, QuantSpec, read_quant_spec
from .gptq import check_default_g_idx, gptq_weight

QUANTIZED_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
# method -> (the tensor name suffixes it reads, the converter of one projection's tensors)
READERS = {"gptq": (QUANTIZED_SUFFIXES, gptq_weight), "awq": (QUANTIZED_SUFFIXES, awq_weight),
           "compressed-tensors": (compressed_tensors.SUFFIXES,
                                  compressed_tensors.compressed_tensors_weight)}
Tensors = Iterator[tuple[str, torch.Tensor]]


def checkpoint_repacker(model: torch.nn.Module, hf_config: dict, quantization: str | None
                        ) -> tuple[Callable[[Tensors], Tensors], str | None]:
    """(wrap, quantization) for the rest of load_model: for a quantized checkpoint, ``wrap``
    turns the weight stream into the repacking one described above and quantization comes back
    None (nothing is left to quantize); for a float checkpoint, ``wrap`` passes the stream as is.
    ValueError, before anything loads, when ``quantization`` contradicts the checkpoint."""
    spec = read_quant_spec(hf_config)
    if spec is None:
        if quantization in CHECKPOINT_METHODS:
            raise ValueError(f"quantization={quantization!r}, but config.json has no "
                             "quantization_config: this checkpoint is not quantized")
        return (lambda weights: weights), quantization
    if quantization is not None and quantization != spec.method:
        raise ValueError(f"quantization={quantization!r}: the checkpoint is already quantized "
                         f"({spec.describe()}); leave quantization unset to serve it as it is")
    if getattr(model, "weight_map", None) is None:
        raise ValueError(f"{type(model).__name__} has no weight map, which {spec.method} "
                         "checkpoints need to find their layers")
    return Repacker(model, spec).stream, None


def fuse(name: str, parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack the parts of a fused layer along N; they must share bits, groups and perm."""
    first = parts[0]
    for part in parts[1:]:
        if part.group_size != first.group_size or part.bits != first.bits:
            raise ValueError(f"{name}: the fused parts are quantized differently "
                             f"({first.bits}-bit group {first.group_size} vs "
                             f"{part.bits}-bit group {part.group_size})")
        if (part.perm is None) != (first.perm is None) or (
                part.perm is not None and not torch.equal(part.perm, first.perm)):
            raise ValueError(f"{name}: the fused parts have different act-order g_idx; lepton "
                             "computes them in one matmul, which needs one input order")
    if len(parts) == 1:
        return first
    zeros = None
    if any(p.zeros is not None for p in parts):   # int8: a symmetric part gets zero points 0
        zeros = torch.cat([p.zeros if p.zeros is not None else torch.zeros_like(p.scales, dtype=torch.int8)
                           for p in parts])
    return QuantizedWeight(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]),
                           zeros, first.bits, first.group_size,
                           (sum(p.shape[0] for p in parts), first.shape[1]), first.dtype, first.perm)


class Repacker:
    """The stream wrapper of one load (see the module doc)."""

    def __init__(self, model: torch.nn.Module, spec: QuantSpec):
        self.spec = spec
        self.weight_map = model.weight_map
        linears = {id(m.weight): m for m in model.modules() if isinstance(m, Linear) and m.weight is not None}
        # weight-map key of a projection's weight -> (its Linear, part index)
        self.parts: dict[str, tuple[Linear, int]] = {}
        for key, target in self.weight_map.targets.items():
            layer = linears.get(id(target.param))
            if layer is not None and key.endswith(".weight"):
                if getattr(target, "shard", None) is not None:
                    raise ValueError(f"{spec.method} checkpoints cannot be sharded for tensor "
                                     "parallelism yet; use tensor_parallel_size=1")
                part = next(i for i in range(len(layer.output_sizes))
                            if target.rows is None or layer.part_rows(i) == target.rows)
                self.parts[key] = (layer, part)
        self.part_keys: dict[Linear, list[str]] = {}
        for key, (layer, part) in sorted(self.parts.items(), key=lambda kv: kv[1][1]):
            self.part_keys.setdefault(layer, []).append(key)
        self.pending: dict[str, dict[str, torch.Tensor]] = {}   # part key -> suffix -> tensor
        self.suffixes, self.convert = READERS[spec.method]
        if spec.method == "compressed-tensors":
            self.required = compressed_tensors.required_suffixes(spec)
        else:
            self.required = {"qweight", "qzeros", "scales"} | (
                {"g_idx"} if spec.method == "gptq" and spec.desc_act else set())

    def stream(self, weights: Tensors) -> Tensors:
        for name, tensor in weights:
            prefix, _, suffix = name.rpartition(".")
            if suffix in self.suffixes:
                self.add(name, prefix, suffix, tensor)
            elif not (suffix == "bias" and self.is_spare_bias(name, prefix, tensor)):
                yield name, tensor
        if self.pending:
            missing = sorted(f"{key.removesuffix('.weight')}.{s}" for key, got in self.pending.items()
                             for s in self.required - set(got))
            first = "weight_packed" if self.spec.method == "compressed-tensors" else "qweight"
            missing += sorted(f"{key.removesuffix('.weight')}.{first}"
                              for key in self.waiting_parts())
            raise ValueError(f"checkpoint lacks {len(missing)} quantized tensor(s): "
                             f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")

    def waiting_parts(self) -> list[str]:
        """Parts of layers with pending tensors whose own tensors never arrived."""
        layers = {self.parts[key][0] for key in self.pending}
        return [key for layer in layers for key in self.part_keys[layer] if key not in self.pending]

    def add(self, name: str, prefix: str, suffix: str, tensor: torch.Tensor) -> None:
        key = self.weight_map.resolve(prefix + ".weight")
        if key not in self.parts:
            raise ValueError(f"checkpoint tensor {name!r} is quantized, but {prefix} is not a "
                             "linear layer of this model (lepton keeps embeddings and LM heads in float)")
        layer, _ = self.parts[key]
        if suffix not in self.required:   # before the check below: it may come after the rest
            self.extra_tensor(name, suffix, layer, tensor)
            return
        if layer.qweight is not None:
            raise ValueError(f"checkpoint tensor {name!r} arrived after its layer was built "
                             "(a duplicate tensor?)")
        self.pending.setdefault(key, {})[suffix] = tensor
        keys = self.part_keys[layer]
        if all(self.required <= self.pending.get(k, {}).keys() for k in keys):
            self.build(layer, keys)

    def extra_tensor(self, name: str, suffix: str, layer: Linear, tensor: torch.Tensor) -> None:
        """A tensor of a known kind that this spec does not need: a GPTQ g_idx without
        act-order is checked and dropped; the others contradict quantization_config."""
        if suffix == "g_idx" and self.spec.method == "gptq":
            # Without act-order nothing is permuted: g_idx must be the plain k // group_size.
            check_default_g_idx(name, tensor, layer.in_features, self.spec.group_size)
            return
        why = {"g_idx": "AWQ checkpoints have no g_idx",
               "weight_zero_point": "zero points, but the config's weights.symmetric is true",
               "weight_g_idx": "activation-ordered groups (actorder 'group'), not read"}[suffix]
        raise ValueError(f"checkpoint tensor {name!r}: {why}")

    def build(self, layer: Linear, keys: list[str]) -> None:
        weight = layer.weight
        parts = [self.convert(key.removesuffix(".weight"), self.pending.pop(key), self.spec,
                              layer.output_sizes[self.parts[key][1]], layer.in_features,
                              weight.dtype) for key in keys]
        qweight = fuse(keys[0].removesuffix(".weight"), parts)
        prepare_quantized(qweight)
        # As Linear.quantize does: the weight map still holds the Parameter, so empty it too.
        layer.qweight, layer.weight = qweight, None
        weight.data = weight.data.new_empty(0)
        self.weight_map.loaded.update(keys)

    def is_spare_bias(self, name: str, prefix: str, tensor: torch.Tensor) -> bool:
        """True for a zero ``.bias`` of a bias-free Linear (older GPTQ packers write one for
        every layer): dropped. A non-zero one is an error: the layer cannot add it."""
        if self.weight_map.resolve(name) is not None:
            return False
        key = self.weight_map.resolve(prefix + ".weight")
        if key not in self.parts:
            return False   # not a Linear: the weight map reports it as unexpected
        if bool(tensor.count_nonzero()):
            raise ValueError(f"checkpoint tensor {name!r} is a non-zero bias, but {prefix} has no "
                             "bias in this architecture (config.json's *_bias flags?)")
        return True
