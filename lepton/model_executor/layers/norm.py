"""Normalization layers over [T, H] activations, with the residual add fused in.

    norm(x)            -> y
    norm(x, residual)  -> (y, s) with s = x + residual, y = norm(s)
so a pre-norm block carries its residual stream without a separate add kernel.
"""

from __future__ import annotations

import torch
from torch import nn

import lepton_kernels as lk


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight (Llama, Mistral, Qwen)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return lk.rms_norm(x, self.weight, self.eps, residual)


class LayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * weight + bias (GPT-2, BERT)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = True,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return lk.layer_norm(x, self.weight, self.bias, self.eps, residual)
