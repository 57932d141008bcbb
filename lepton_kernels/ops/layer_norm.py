"""LayerNorm with an optional fused residual add (Ba et al. 2016, arXiv:1607.06450).

    mu = mean(x over H);  var = mean((x - mu)^2 over H)      (biased, as torch.nn.LayerNorm)
    y = (x - mu) / sqrt(var + eps) * weight + bias           (bias None: no bias)

With ``residual`` given, the residual stream is updated first and normalized:
    s = x + residual;  returns (layer_norm(s), s)
The statistics are computed in float32 whatever the input dtype; s is returned in x's dtype.
"""

from __future__ import annotations

import torch

from ..backends import register_triton
from ..checks import check_same, check_same_device, check_tensor, randn
from ..registry import SampleInput, register_op


def check_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
               residual: torch.Tensor | None) -> None:
    """Shapes, dtypes and devices (no device sync); the Triton launcher runs it too."""
    check_tensor("x", x, 2, floating=True)
    check_tensor("weight", weight, 1, floating=True)
    check_same("weight.shape[0]", weight.shape[0], "x.shape[1] (hidden)", x.shape[1])
    if bias is not None:
        check_tensor("bias", bias, 1, floating=True)
        check_same("bias.shape[0]", bias.shape[0], "x.shape[1] (hidden)", x.shape[1])
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if residual is not None:
        check_tensor("residual", residual, 2, floating=True)
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} must equal x shape {tuple(x.shape)}")
    check_same_device(x=x, weight=weight, bias=bias, residual=residual)


@register_op
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5,
               residual: torch.Tensor | None = None):
    """x[T,H], weight[H], bias[H] or None -> y[T,H]; with residual[T,H]: (y, x + residual)."""
    check_args(x, weight, bias, eps, residual)
    s = x.float()
    if residual is not None:
        s = s + residual.float()
    centered = s - s.mean(dim=-1, keepdim=True)
    y = centered * torch.rsqrt(centered.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    if bias is not None:
        y = y + bias.float()
    if residual is None:
        return y.to(x.dtype)
    return y.to(x.dtype), s.to(x.dtype)


@layer_norm.set_sample_inputs
def sample_inputs(device="cpu", dtype=torch.float32) -> list[SampleInput]:
    g = torch.Generator().manual_seed(0)
    samples = []
    for tokens, hidden in [(1, 128), (7, 769), (83, 64)]:
        # An offset mean makes the centering matter.
        x = randn(tokens, hidden, device=device, dtype=dtype, generator=g) + 0.5
        w = randn(hidden, device=device, dtype=dtype, generator=g, scale=0.1) + 1
        b = randn(hidden, device=device, dtype=dtype, generator=g, scale=0.1)
        samples.append(SampleInput(f"T{tokens}_H{hidden}", (x, w, b, 1e-5)))
        r = randn(tokens, hidden, device=device, dtype=dtype, generator=g)
        samples.append(SampleInput(f"T{tokens}_H{hidden}_residual", (x, w, b, 1e-6), {"residual": r}))
    samples.append(SampleInput("T7_H769_nobias", (samples[2].args[0], samples[2].args[1], None, 1e-5)))
    return samples


def load_triton():
    """The Triton launcher (imports triton: runs on the first call that selects it)."""
    from ..triton_kernels.layer_norm import layer_norm as launcher
    return launcher


# Any hidden size: rows wider than one register block are walked in chunks.
register_triton(layer_norm, load_triton)
