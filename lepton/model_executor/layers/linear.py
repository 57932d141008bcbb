"""Linear layers: y = x W^T + b, with fused projections and weight-only quantization.

A fused layer stacks several HF projections along the output dim (q|k|v, gate|up) so one
matmul serves them all; ``output_sizes`` gives the parts and ``part_rows(i)`` the rows of one
(where the weight map loads that HF tensor). ``quantize(bits, group_size)`` swaps the weight for
lepton_kernels' packed int8/int4 form (and builds the layout the device's kernel reads) and the
forward becomes lepton_kernels.quant_matmul; the loader calls it as soon as a layer's last
checkpoint tensor is in (see :func:`quantization_plan`), so the float model never exists whole.

On a CPU in float32, ``prepack()`` reorders the weight once into oneDNN's blocked layout
(:class:`PackedWeight`): MKL's sgemm otherwise repacks the whole weight on every call, which
dominates decode-sized matmuls (measured here: a 32000x512 lm_head at 8 rows 11.6 -> 4.9 ms, at
1 row 6.9 -> 2.9 ms). The dense weight is dropped, so memory does not grow.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch import nn

import lepton_kernels as lk
from lepton_kernels.ops.quant_matmul import prepare_quantized
from lepton_kernels.ops.quantize import QuantizedWeight

QUANTIZATION_BITS = {"int8": 8, "int4": 4}


# Rows quantized at a time: quantize's int4 clipping search holds several float32 temporaries the
# size of its input, so a whole 11264x2048 weight would add ~0.7 GB to the peak while loading.
QUANTIZE_ROWS = 1024


def quantize_by_rows(weight: torch.Tensor, bits: int, group_size: int | None) -> QuantizedWeight:
    """lk.quantize(weight, bits, group_size), QUANTIZE_ROWS rows at a time: every scale, zero
    point and packed word depends on its own row only, so the result is the same."""
    if weight.shape[0] <= QUANTIZE_ROWS:
        return lk.quantize(weight, bits=bits, group_size=group_size)
    parts = [lk.quantize(weight[i:i + QUANTIZE_ROWS], bits=bits, group_size=group_size)
             for i in range(0, weight.shape[0], QUANTIZE_ROWS)]
    zeros = None if bits == 8 else torch.cat([p.zeros for p in parts])
    return QuantizedWeight(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]), zeros,
                           bits, parts[0].group_size, tuple(weight.shape), weight.dtype)


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch._C._nn, "mkldnn_linear")


# The weight layout oneDNN picks depends on a hint of the row count; any row count then works.
# 64 served decode (1-64 rows) and prefill (512 rows) best in a sweep here (2752x512 at 8 rows:
# 125 us vs 298 us for mkldnn_linear on a plain to_mkldnn weight, 303 us for F.linear).
PACK_ROWS_HINT = 64


def _pointwise_available() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    return ops is not None and hasattr(ops, "_linear_pointwise") and hasattr(ops, "_reorder_linear_weight")


class PackedWeight:
    """y = x W^T + b with W held in oneDNN's layout (CPU, float32); x[T, in] dense -> y dense.

    With torch's mkldnn._linear_pointwise (the op torch.compile's CPU backend emits) the input
    and output stay dense; otherwise mkldnn_linear, which converts them on every call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or not onednn_available():
            raise ValueError("PackedWeight needs a float32 CPU weight and a torch built with oneDNN")
        self.out_features, self.in_features = weight.shape
        self.pointwise = _pointwise_available()
        if self.pointwise:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_ROWS_HINT)
            self.bias = None if bias is None else bias.detach().contiguous()
        else:
            self.weight = weight.detach().to_mkldnn()
            self.bias = None if bias is None else bias.detach().to_mkldnn()

    def dense_weight(self) -> torch.Tensor:
        return self.weight.to_dense()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError(f"a prepacked linear takes float32 CPU x[T, in], got {tuple(x.shape)} "
                             f"{x.dtype} on {x.device}")
        if x.shape[0] == 0:
            return x.new_empty(0, self.out_features)
        if self.pointwise:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, self.bias, "none", [], "")
        return torch._C._nn.mkldnn_linear(x.contiguous().to_mkldnn(), self.weight, self.bias).to_dense()


_deferral = threading.local()


@contextlib.contextmanager
def deferred_weights():
    """Linear layers built inside get their weight on the meta device, and storage on their real
    device only when the loader copies a checkpoint tensor into it (:func:`materialize`).

    The loader builds a model this way when its Linear weights will be replaced while loading
    (quantized as each layer's tensors arrive, or by a GPTQ / AWQ checkpoint's packed weights).
    On a CPU an unwritten torch.empty costs no memory, but on CUDA it is allocated at once: the
    whole float model would sit in GPU memory before the first layer was packed. Deferred, float
    storage peaks near one fused layer's weight (or none, for packed checkpoints)."""
    previous = getattr(_deferral, "active", False)
    _deferral.active = True
    try:
        yield
    finally:
        _deferral.active = previous


def materialize(param: nn.Parameter) -> None:
    """Give a deferred (meta) weight uninitialized storage on the device it was built for."""
    if param.is_meta:
        real = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=param.deferred_device),
                            requires_grad=False)
        # In place, so the weight map and the layer keep this Parameter object (a meta tensor's
        # .data cannot be set to a real one).
        torch.utils.swap_tensors(param, real)


class Linear(nn.Module):
    """x[T, in_features] -> [T, sum(output_sizes)]; weights are allocated, not initialized
    (inside :func:`deferred_weights`, not even allocated until the loader fills them)."""

    def __init__(self, in_features: int, output_sizes: int | list[int], bias: bool = False,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        self.in_features, self.out_features = in_features, sum(self.output_sizes)
        deferred = getattr(_deferral, "active", False)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features, dtype=dtype,
                                               device="meta" if deferred else device), requires_grad=False)
        if deferred:
            self.weight.deferred_device = torch.device("cpu") if device is None else torch.device(device)
        self.bias = (nn.Parameter(torch.empty(self.out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        self.qweight = None   # lepton_kernels QuantizedWeight once quantized
        self.packed: PackedWeight | None = None   # oneDNN layout once prepacked (CPU float32)

    def part_rows(self, part: int) -> slice:
        """Rows of the fused weight that hold output part ``part``."""
        start = sum(self.output_sizes[:part])
        return slice(start, start + self.output_sizes[part])

    def quantize(self, bits: int = 8, group_size: int | None = None) -> None:
        """Replace the float weight by its weight-only quantized form (the bias stays float)."""
        weight = self.weight
        self.qweight = quantize_by_rows(weight.data, bits, group_size)
        prepare_quantized(self.qweight)
        self.weight = None
        # A model's weight map still holds the Parameter: empty it, so the float storage is freed
        # now rather than when the map goes (a later load into it fails on the shape).
        weight.data = weight.data.new_empty(0)

    def prepack(self) -> bool:
        """Move a float32 CPU weight into oneDNN's layout (see the module doc); False if it stays."""
        if (self.weight is None or self.weight.device.type != "cpu" or self.weight.dtype != torch.float32
                or not onednn_available()):
            return False
        self.packed = PackedWeight(self.weight.data, None if self.bias is None else self.bias.data)
        self.weight = None
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed(x)
        if self.qweight is not None:
            return lk.quant_matmul(x, self.qweight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        quant = (f", int{self.qweight.bits}" if self.qweight is not None
                 else ", onednn" if self.packed is not None else "")
        return f"in={self.in_features}, out={self.output_sizes}, bias={self.bias is not None}{quant}"


class QuantizedHead:
    """An LM head weight-only quantized like the Linear layers, in the model's ``lm_head_packed``
    slot (compute_logits calls it): on a small model the head is the largest matmul, e.g. a
    32000x512 float32 head is 65 MB read per decoded token, more than all its layers together."""

    def __init__(self, weight: torch.Tensor, bits: int, group_size: int | None):
        self.out_features, self.in_features = weight.shape
        self.qweight = quantize_by_rows(weight, bits, group_size)
        prepare_quantized(self.qweight)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return lk.quant_matmul(hidden, self.qweight)


def int4_group(in_features: int) -> int | None:
    """The largest int4 group size (128, 64, 32) that divides ``in_features``, else None."""
    return next((g for g in (128, 64, 32) if in_features % g == 0), None)


def quantize_lm_head(model: nn.Module, method: str) -> bool:
    """Quantize a decoder's ``model.lm_head`` into ``model.lm_head_packed`` (a tied head keeps the
    float tensor, which the embedding lookup reads; an untied one is freed). False when there is
    no head, it is already replaced, or int4 groups do not divide its inputs (it stays float)."""
    head = getattr(model, "lm_head", None)
    if not isinstance(head, torch.Tensor) or getattr(model, "lm_head_packed", None) is not None:
        return False
    bits = QUANTIZATION_BITS[method]
    group = int4_group(head.shape[1]) if bits == 4 else None
    if bits == 4 and group is None:
        return False
    model.lm_head_packed = QuantizedHead(head.data, bits, group)
    if not getattr(model, "tie_word_embeddings", False):
        model.lm_head = None
        head.data = head.data.new_empty(0)   # the weight map may still hold the Parameter
    return True


def quantization_plan(model: nn.Module, method: str) -> list[tuple[str, Linear, int, int | None]]:
    """(name, layer, bits, group_size) for every Linear of ``model`` under ``quantization=method``:
    int8 per output channel; int4 in groups of 128, else 64, else 32 (the largest that divides
    the layer's inputs). Raises ValueError before anything is loaded when a layer cannot be."""
    bits = QUANTIZATION_BITS[method]
    plan = []
    for name, layer in model.named_modules():
        if not isinstance(layer, Linear):
            continue
        group = None
        if bits == 4:
            # A row-parallel layer (tensor parallel) holds in_features of its full_in_features
            # inputs: its groups are the unsharded layer's, so each shard must end on a boundary.
            full = getattr(layer, "full_in_features", layer.in_features)
            group = int4_group(full)
            if group is None:
                raise ValueError(f"quantization='int4': layer {name} has {full} inputs, not a multiple of 32")
            if layer.in_features % group:
                raise ValueError(f"quantization='int4' with tensor parallelism: layer {name} keeps "
                                 f"{layer.in_features} of its {full} inputs per rank, not a multiple of its "
                                 f"int4 group ({group}); use a tensor_parallel_size that splits {full} into "
                                 f"multiples of {group}, or quantization='int8'")
        plan.append((name, layer, bits, group))
    if not plan:
        raise ValueError(f"quantization={method!r}: {type(model).__name__} has no quantizable linear layers")
    return plan


def prepack_linears(model: nn.Module) -> int:
    """prepack() every float32 CPU Linear of ``model``; returns how many were packed."""
    return sum(module.prepack() for module in model.modules() if isinstance(module, Linear))


def prepack_model(model: nn.Module) -> int:
    """prepack_linears(model), plus the LM head of a decoder (``model.lm_head``, used by
    compute_logits through ``model.lm_head_packed``). A tied head keeps its dense tensor, which the
    embedding lookup still reads; an untied one is dropped. Call it after loading: it releases the
    model's checkpoint map. Returns how many matmuls were packed."""
    if onednn_available() and getattr(model, "weight_map", None) is not None:
        # The checkpoint map references every dense weight: release it first, so each dense
        # weight is freed as soon as its packed copy exists (peak memory: one extra matmul).
        # A packed model cannot load weights again.
        model.weight_map = None
    count = prepack_linears(model)
    head = getattr(model, "lm_head", None)
    if (isinstance(head, torch.Tensor) and head.device.type == "cpu" and head.dtype == torch.float32
            and onednn_available() and getattr(model, "lm_head_packed", None) is None):
        model.lm_head_packed = PackedWeight(head.data)
        if not getattr(model, "tie_word_embeddings", False):
            model.lm_head = None
        count += 1
    return count
