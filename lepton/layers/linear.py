"""Linear layers: y = x W^T + b, with fused projections and weight-only quantization.

A fused layer stacks several HF projections along the output dim (q|k|v, gate|up) so one
matmul serves them all; ``output_sizes`` gives the parts and ``load_part`` fills one. After
loading, ``quantize(bits, group_size)`` swaps the weight for lepton_kernels' packed int8/int4
form and the forward becomes lepton_kernels.quant_matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import lepton_kernels as lk


class Linear(nn.Module):
    """x[T, in_features] -> [T, sum(output_sizes)]; weights are allocated, not initialized."""

    def __init__(self, in_features: int, output_sizes: int | list[int], bias: bool = False,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.output_sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        self.in_features, self.out_features = in_features, sum(self.output_sizes)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(self.out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        self.qweight = None   # lepton_kernels QuantizedWeight once quantized

    def part_rows(self, part: int) -> slice:
        """Rows of the fused weight that hold output part ``part``."""
        start = sum(self.output_sizes[:part])
        return slice(start, start + self.output_sizes[part])

    def quantize(self, bits: int = 8, group_size: int | None = None) -> None:
        """Replace the float weight by its weight-only quantized form (the bias stays float)."""
        self.qweight = lk.quantize(self.weight.data, bits=bits, group_size=group_size)
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            return lk.quant_matmul(x, self.qweight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        quant = f", int{self.qweight.bits}" if self.qweight is not None else ""
        return f"in={self.in_features}, out={self.output_sizes}, bias={self.bias is not None}{quant}"
