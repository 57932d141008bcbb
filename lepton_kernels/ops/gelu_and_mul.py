"""GeGLU (Shazeer 2020, arXiv:2002.05202): the gated activation of Gemma and friends.

    x = [gate | up] (each I wide);  y = gelu(gate) * up
    approximate="none": gelu(g) = g/2 * (1 + erf(g / sqrt(2)))
    approximate="tanh": gelu(g) = g/2 * (1 + tanh(sqrt(2/pi) * (g + 0.044715 g^3)))
Math in float32; y is returned in x's dtype.
"""

from __future__ import annotations

import torch

from ..backends import register_triton
from ..registry import SampleInput, register_op
from .silu_and_mul import check_gated_input, gated_samples

APPROXIMATIONS = ("none", "tanh")


def check_args(x: torch.Tensor, approximate: str) -> None:
    """Shape and the approximation's name; the Triton launcher runs it too."""
    check_gated_input(x)
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")


@register_op
def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """x[T, 2I] -> gelu(x[:, :I], approximate) * x[:, I:], shape [T, I]."""
    check_args(x, approximate)
    gate, up = x.float().chunk(2, dim=-1)
    return (torch.nn.functional.gelu(gate, approximate=approximate) * up).to(x.dtype)


@gelu_and_mul.set_sample_inputs
def sample_inputs(device="cpu", dtype=torch.float32) -> list[SampleInput]:
    samples = []
    for approximate in APPROXIMATIONS:
        for s in gated_samples(device, dtype):
            samples.append(SampleInput(f"{s.name}_{approximate}", s.args, {"approximate": approximate}))
    return samples


def load_triton():
    """The Triton launcher (imports triton: runs on the first call that selects it)."""
    from ..triton_kernels.activation import gelu_and_mul as launcher
    return launcher


register_triton(gelu_and_mul, load_triton)
