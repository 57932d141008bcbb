"""Rotary position embedding, RoPE (Su et al. 2021, arXiv:2104.09864), applied to q and k.

For a token at position p, with cos_sin_cache[p] = [cos(p * inv_freq) | sin(p * inv_freq)]
(each half rot_dim/2 wide), the first rot_dim dims of every head are rotated pair by pair:
    (x1, x2) -> (x1 * cos - x2 * sin,  x2 * cos + x1 * sin)
is_neox=True  (Llama, Qwen, Mistral): the pairs are (x[i], x[i + rot_dim/2]), the two halves;
is_neox=False (GPT-J, interleaved):   the pairs are (x[2i], x[2i + 1]).
Dims rot_dim..D pass through unchanged (partial rotary, e.g. Phi, GPT-NeoX, ChatGLM).
Math in float32, rounded back to q's and k's dtypes.

In place, as vLLM's op: q and k are overwritten with their rotated values and returned (the same
tensor objects). They may be strided views, e.g. slices of a fused qkv projection's output
(q = qkv[:, :Hq*D].view(T, Hq, D)); only their own elements are written, so the rest of that
buffer (v) is untouched and no per-layer copy of q/k is made. q and k must not overlap.

Implementations: ``triton`` on CUDA; ``cpu`` (lepton_kernels/cpu_kernels/rotary_embedding.c, a
small C kernel compiled on first use) for float32 CPU tensors with head_dim contiguous, the same
bits as this spec at a fraction of its per-call cost; eager for everything else.
"""

from __future__ import annotations

import torch

from ..backends import cpu_kernel_module, register_cpu, register_triton
from ..checks import check_same, check_same_device, check_tensor, randn
from ..registry import SampleInput, register_op

_INT_DTYPES = (torch.int64, torch.int32)


def check_args(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
               is_neox: bool, check_range: bool = True) -> None:
    """Shapes, dtypes, devices and strides; ``check_range`` also reads positions (a device sync),
    which the Triton launcher skips."""
    check_tensor("positions", positions, 1, dtypes=_INT_DTYPES)
    check_tensor("q", q, 3, floating=True)
    check_tensor("k", k, 3, floating=True)
    check_tensor("cos_sin_cache", cos_sin_cache, 2, floating=True)
    check_same("q.shape[0] (tokens)", q.shape[0], "positions.shape[0]", positions.shape[0])
    check_same("k.shape[0] (tokens)", k.shape[0], "positions.shape[0]", positions.shape[0])
    check_same("k.shape[2] (head_dim)", k.shape[2], "q.shape[2] (head_dim)", q.shape[2])
    rot_dim = cos_sin_cache.shape[1]
    if rot_dim == 0 or rot_dim % 2 or rot_dim > q.shape[2]:
        raise ValueError(f"cos_sin_cache.shape[1] (rot_dim, {rot_dim}) must be even, positive and "
                         f"at most the head_dim {q.shape[2]}")
    if not isinstance(is_neox, bool):
        raise ValueError(f"is_neox must be a bool, got {type(is_neox).__name__}")
    check_same_device(positions=positions, q=q, k=k, cos_sin_cache=cos_sin_cache)
    for name, x in (("q", q), ("k", k)):
        # Written in place: a broadcast view (stride 0) would have one element stand for several.
        if any(st == 0 and n > 1 for st, n in zip(x.stride(), x.shape)):
            raise ValueError(f"{name} is rotated in place and must not be a broadcast (stride 0) view, "
                             f"got shape {tuple(x.shape)} with strides {x.stride()}")
    if check_range and positions.numel():
        lo, hi = torch.aminmax(positions)
        if lo < 0 or hi >= cos_sin_cache.shape[0]:
            raise ValueError(f"positions must lie in [0, {cos_sin_cache.shape[0]}) "
                             f"(cos_sin_cache.shape[0]), got values in [{int(lo)}, {int(hi)}]")


def _rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> None:
    # x: [T, H, D], any strides; cos, sin: [T, 1, rot_dim/2] in float32. Only x[..., :rot_dim] is
    # written; the right-hand side is a new tensor, complete before copy_ overwrites its inputs.
    rot = x[..., :2 * cos.shape[-1]]
    xf = rot.float()
    if is_neox:
        x1, x2 = xf.chunk(2, dim=-1)
        rot.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))
    else:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        rot.copy_(torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2))


@register_op(dispatch_arg="q")   # positions come first but are integers
def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor, is_neox: bool = True):
    """positions[T] int, q[T,Hq,D], k[T,Hk,D], cos_sin_cache[max_pos, rot_dim] -> (q, k).

    Modifies q and k in place (through their strides) and returns those same tensors.
    """
    check_args(positions, q, k, cos_sin_cache, is_neox)
    cos, sin = cos_sin_cache.index_select(0, positions).float().unsqueeze(1).chunk(2, dim=-1)
    _rotate_(q, cos, sin, is_neox)
    _rotate_(k, cos, sin, is_neox)
    return q, k


def build_cos_sin_cache(max_position: int, rot_dim: int, base: float = 10000.0,
                        dtype: torch.dtype = torch.float32, device=None,
                        inv_freq: torch.Tensor | None = None) -> torch.Tensor:
    """The [max_position, rot_dim] table [cos(p * inv_freq) | sin(p * inv_freq)], p = 0..max-1.

    inv_freq defaults to base^(-2i/rot_dim), i < rot_dim/2; pass your own for scaled RoPE variants.
    Angles are computed in float32, as Hugging Face transformers does, then cast to ``dtype``.
    """
    if rot_dim <= 0 or rot_dim % 2:
        raise ValueError(f"rot_dim must be even and positive, got {rot_dim}")
    if max_position <= 0:
        raise ValueError(f"max_position must be positive, got {max_position}")
    if inv_freq is None:
        inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, device=device, dtype=torch.float32) / rot_dim))
    else:
        check_tensor("inv_freq", inv_freq, 1, floating=True)
        check_same("inv_freq.shape[0]", inv_freq.shape[0], "rot_dim / 2", rot_dim // 2)
        inv_freq = inv_freq.to(device=device, dtype=torch.float32)
    angles = torch.outer(torch.arange(max_position, device=inv_freq.device, dtype=torch.float32), inv_freq)
    return torch.cat((angles.cos(), angles.sin()), dim=-1).to(dtype)


@rotary_embedding.set_sample_inputs
def sample_inputs(device="cpu", dtype=torch.float32) -> list[SampleInput]:
    g = torch.Generator().manual_seed(0)
    samples = []
    # (tokens, q heads, kv heads, head_dim, rot_dim, is_neox, cache dtype)
    for tokens, hq, hk, d, rd, neox, cache_dtype in [(7, 4, 2, 64, 64, True, dtype),
                                                     (1, 2, 2, 80, 32, False, dtype),
                                                     (83, 2, 1, 80, 80, True, torch.float32),
                                                     (7, 3, 1, 80, 32, True, dtype),
                                                     (7, 2, 1, 64, 64, False, torch.float32)]:
        max_pos = 300
        positions = torch.randint(0, max_pos, (tokens,), generator=g).to(device)
        q = randn(tokens, hq, d, device=device, dtype=dtype, generator=g)
        k = randn(tokens, hk, d, device=device, dtype=dtype, generator=g)
        cache = build_cos_sin_cache(max_pos, rd, dtype=cache_dtype, device=device)
        name = f"T{tokens}_Hq{hq}_Hk{hk}_D{d}_rot{rd}_{'neox' if neox else 'gptj'}"
        samples.append(SampleInput(name, (positions, q, k, cache, neox)))
    return samples


def load_triton():
    """The Triton launcher (imports triton: runs on the first call that selects it)."""
    from ..triton_kernels.rotary_embedding import rotary_embedding as launcher
    return launcher


register_triton(rotary_embedding, load_triton)


def cpu_supports(positions, q, k, cos_sin_cache, is_neox=True):
    """The C kernel's per-call check: float32, head_dim contiguous, no autograd."""
    return cpu_kernel_module("rotary_embedding").supports(positions, q, k, cos_sin_cache, is_neox)


register_cpu(rotary_embedding, dtypes=(torch.float32,), supports=cpu_supports)
