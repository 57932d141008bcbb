"""MLP activations by their Hugging Face config names (``hidden_act`` / ``activation_function``).

Gated MLPs (Llama family: act(gate) * up) use the fused lepton_kernels ops on [gate | up].
Plain MLPs (GPT-2, BERT) apply the activation alone; lepton_kernels has no op for that
elementwise step, so it is torch's function.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

import lepton_kernels as lk

# HF name -> gelu approximation ("none": erf form, "tanh": the GPT-2 / "new" form)
_GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}
_PLAIN = {"relu": F.relu, "silu": F.silu, "swish": F.silu}


def gated_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """x[T, 2I] = [gate | up] -> act(gate) * up, [T, I]."""
    if name in ("silu", "swish"):
        return lk.silu_and_mul
    if name in _GELU:
        approximate = _GELU[name]
        return lambda x: lk.gelu_and_mul(x, approximate)
    raise ValueError(f"unsupported gated activation {name!r}; supported: silu, swish, {', '.join(_GELU)}")


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Elementwise act(x)."""
    if name in _GELU:
        approximate = _GELU[name]
        return lambda x: F.gelu(x, approximate=approximate)
    if name in _PLAIN:
        return _PLAIN[name]
    raise ValueError(f"unsupported activation {name!r}; supported: {', '.join([*_GELU, *_PLAIN])}")
