"""SwiGLU's gate (Shazeer 2020, arXiv:2002.05202): the activation of Llama / Qwen / Mistral MLPs.

    x = [gate | up] (each I wide);  y = silu(gate) * up,  silu(g) = g * sigmoid(g) = g / (1 + e^-g)
Math in float32; y is returned in x's dtype.
"""

from __future__ import annotations

import torch

from ..backends import register_triton
from ..checks import check_tensor, randn
from ..registry import SampleInput, register_op


def check_gated_input(x: torch.Tensor) -> None:
    """x[T, 2I] (no device sync): shared with gelu_and_mul and the Triton launchers."""
    check_tensor("x", x, 2, floating=True)
    if x.shape[1] % 2:
        raise ValueError(f"x.shape[1] must be even ([gate | up]), got {x.shape[1]}")


@register_op
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x[T, 2I] -> silu(x[:, :I]) * x[:, I:], shape [T, I]."""
    check_gated_input(x)
    gate, up = x.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


def gated_samples(device, dtype) -> list[SampleInput]:
    """Odd and even intermediate sizes, large magnitudes for the saturating tails."""
    g = torch.Generator().manual_seed(0)
    return [SampleInput(f"T{tokens}_I{inter}", (randn(tokens, 2 * inter, device=device, dtype=dtype,
                                                      generator=g, scale=2.0),))
            for tokens, inter in [(1, 128), (7, 769), (83, 64)]]


@silu_and_mul.set_sample_inputs
def sample_inputs(device="cpu", dtype=torch.float32) -> list[SampleInput]:
    return gated_samples(device, dtype)


def load_triton():
    """The Triton launcher (imports triton: runs on the first call that selects it)."""
    from ..triton_kernels.activation import silu_and_mul as launcher
    return launcher


register_triton(silu_and_mul, load_triton)
