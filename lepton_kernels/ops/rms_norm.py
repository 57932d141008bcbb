"""RMSNorm with an optional fused residual add (Zhang & Sennrich 2019, arXiv:1910.07467).

    y = x / sqrt(mean(x^2 over H) + eps) * weight

With ``residual`` given, the residual stream is updated first and normalized:
    s = x + residual;  returns (rms_norm(s), s)
The statistics are computed in float32 whatever the input dtype; s is returned in x's dtype.

Implementations: ``triton`` on CUDA tensors; ``cpu`` (lepton_kernels/cpu_kernels/rms_norm.py, a
small C kernel compiled on first use) on CPU tensors, float32 natively and float16 / bfloat16
upcast around it as here; calls that need gradients stay on this eager spec.
"""

from __future__ import annotations

import torch

from ..backends import register_cpu, register_triton
from ..checks import check_same, check_same_device, check_tensor, randn
from ..registry import SampleInput, register_op


def check_args(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None) -> None:
    """Shapes, dtypes and devices (no device sync); the Triton launcher runs it too."""
    check_tensor("x", x, 2, floating=True)
    check_tensor("weight", weight, 1, floating=True)
    check_same("weight.shape[0]", weight.shape[0], "x.shape[1] (hidden)", x.shape[1])
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if residual is not None:
        check_tensor("residual", residual, 2, floating=True)
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} must equal x shape {tuple(x.shape)}")
    check_same_device(x=x, weight=weight, residual=residual)


@register_op
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
             residual: torch.Tensor | None = None):
    """x[T,H], weight[H] -> y[T,H]; with residual[T,H]: (y, x + residual)."""
    check_args(x, weight, eps, residual)
    s = x.float()
    if residual is not None:
        s = s + residual.float()
    y = s * torch.rsqrt(s.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    if residual is None:
        return y.to(x.dtype)
    return y.to(x.dtype), s.to(x.dtype)


@rms_norm.set_sample_inputs
def sample_inputs(device="cpu", dtype=torch.float32) -> list[SampleInput]:
    g = torch.Generator().manual_seed(0)
    samples = []
    for tokens, hidden in [(1, 128), (7, 769), (83, 64)]:
        x = randn(tokens, hidden, device=device, dtype=dtype, generator=g)
        w = randn(hidden, device=device, dtype=dtype, generator=g, scale=0.1) + 1
        samples.append(SampleInput(f"T{tokens}_H{hidden}", (x, w, 1e-6)))
        r = randn(tokens, hidden, device=device, dtype=dtype, generator=g)
        samples.append(SampleInput(f"T{tokens}_H{hidden}_residual", (x, w, 1e-5), {"residual": r}))
    return samples


def load_triton():
    """The Triton launcher (imports triton: runs on the first call that selects it)."""
    from ..triton_kernels.rms_norm import rms_norm as launcher
    return launcher


# Any hidden size: rows wider than one register block are walked in chunks.
register_triton(rms_norm, load_triton)


def cpu_supports(x, weight, eps=1e-6, residual=None) -> bool | str:
    """The C kernel's per-call check: it has no backward. Here, not in the kernel's module, so
    a call pays no extra frame for it (it runs on every call); grad mode is read first because
    the engine runs under inference_mode, where that one read settles it."""
    if torch.is_grad_enabled() and (getattr(x, "requires_grad", False)
                                    or getattr(weight, "requires_grad", False)
                                    or getattr(residual, "requires_grad", False)):
        return "an input requires grad and the cpu kernel has no backward"
    return True


# On CPU tensors the C kernel; float16 / bfloat16 are upcast around it (still far fewer ops).
register_cpu(rms_norm, dtypes=(torch.float32, torch.float16, torch.bfloat16), supports=cpu_supports)
