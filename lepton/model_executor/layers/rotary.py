"""Rotary position embedding (RoPE, arXiv:2104.09864) with the scaling variants of HF configs.

The table cos_sin_cache[p] = [cos(p * inv_freq) | sin(p * inv_freq)] (times YaRN's attention
factor) is built once; every step only gathers rows of it (lepton_kernels.rotary_embedding).
inv_freq follows Hugging Face transformers' formulas in float32, so logits match it:
    default   inv_freq_i = base^(-2i/d)                       (d = rotary dim)
    linear    inv_freq / factor                               (position interpolation)
    llama3    low frequencies / factor, high ones kept, a smooth ramp between (Llama 3.1)
    yarn      NTK-by-parts blend of interpolated and extrapolated frequencies, cos/sin scaled
              by the attention factor 0.1 ln(factor) + 1 (or the config's attention_factor)
    dynamic   NTK-aware: for a sequence of length L > max_position_embeddings (M),
              base' = base * (factor * L / M - (factor - 1))^(d / (d - 2)).
              Positions p < M use the plain table, exactly as transformers does while sequences
              stay within M. Past M, transformers re-rotates the whole current sequence with
              L = max position + 1 of the batch; a paged cache cannot re-rotate cached keys, so
              row p of the table uses L = p + 1: what transformers computes for the token added
              at position p by incremental decoding. The table extends to factor * M positions.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import lepton_kernels as lk
from lepton_kernels.ops.rotary_embedding import build_cos_sin_cache

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def rope_parameters(config: dict) -> dict:
    """The RoPE settings of an HF config dict, old (rope_theta + rope_scaling) or new (rope_parameters)."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    if "partial_rotary_factor" in config:
        params.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    if params["rope_type"] in ("llama3", "yarn"):
        params.setdefault("original_max_position_embeddings",
                          config.get("original_max_position_embeddings", config["max_position_embeddings"]))
    return params


def rope_max_positions(max_position_embeddings: int, params: dict) -> int:
    """Longest sequence a RoPE variant serves (vLLM's rule): yarn original_max_position_embeddings
    x factor, linear and dynamic max_position_embeddings x factor; llama3 and default configs
    already state their full length."""
    factor = float(params.get("factor") or 1.0)
    if params["rope_type"] == "yarn":
        return max(max_position_embeddings, int(params["original_max_position_embeddings"] * factor))
    if params["rope_type"] in ("linear", "dynamic"):
        return int(max_position_embeddings * factor)
    return max_position_embeddings


def _require(params: dict, *keys: str) -> None:
    missing = [k for k in keys if params.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling of type {params['rope_type']!r} needs {', '.join(missing)} in config.json")


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(params: dict, dim: int) -> torch.Tensor:
    _require(params, "factor", "low_freq_factor", "high_freq_factor")
    inv_freq = _base_inv_freq(params["rope_theta"], dim)
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(params: dict, dim: int) -> tuple[torch.Tensor, float]:
    _require(params, "factor")
    base, factor = params["rope_theta"], params["factor"]
    old_len = params["original_max_position_embeddings"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(params.get("beta_fast") or 32), correction_dim(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def _dynamic_table(params: dict, dim: int, max_position: int) -> torch.Tensor:
    _require(params, "factor")
    base, factor = params["rope_theta"], params["factor"]
    extended = int(max_position * factor)
    table = build_cos_sin_cache(max_position, dim, inv_freq=_base_inv_freq(base, dim))
    if extended <= max_position:
        return table
    # Row p >= max_position: inv_freq for a sequence of p + 1 tokens, float32 like transformers.
    seq_len = torch.arange(max_position + 1, extended + 1, dtype=torch.int64)
    scaled_base = base * ((factor * seq_len / max_position) - (factor - 1)) ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (scaled_base[:, None] ** exponents[None, :])               # [N, dim/2]
    angles = (seq_len - 1).float()[:, None] * inv_freq
    return torch.cat((table, torch.cat((angles.cos(), angles.sin()), dim=-1)))


def build_rope_table(params: dict, rotary_dim: int, max_position: int) -> torch.Tensor:
    """float32 cos_sin_cache [positions, rotary_dim] on the CPU for ``rope_parameters(config)``."""
    rope_type = params["rope_type"]
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported RoPE scaling type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    if rope_type == "dynamic":
        return _dynamic_table(params, rotary_dim, max_position)
    scale = 1.0
    if rope_type == "default":
        inv_freq = _base_inv_freq(params["rope_theta"], rotary_dim)
    elif rope_type == "linear":
        _require(params, "factor")
        inv_freq = _base_inv_freq(params["rope_theta"], rotary_dim) / params["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3_inv_freq(params, rotary_dim)
    else:
        inv_freq, scale = _yarn_inv_freq(params, rotary_dim)
    table = build_cos_sin_cache(rope_max_positions(max_position, params), rotary_dim, inv_freq=inv_freq)
    return table * scale if scale != 1.0 else table


class RotaryEmbedding(nn.Module):
    """Applies RoPE in place to q[T, Hq, D] and k[T, Hk, D] at ``positions``; rotary_dim <= D (partial)."""

    def __init__(self, head_dim: int, max_position: int, params: dict, is_neox: bool = True,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        self.is_neox = is_neox
        table = build_rope_table(params, self.rotary_dim, max_position)
        # The table is rounded to the model dtype, as transformers rounds cos/sin before use.
        self.register_buffer("cos_sin_cache", table.to(device=device, dtype=dtype), persistent=False)

    @property
    def max_position(self) -> int:
        return self.cos_sin_cache.shape[0]

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """Rotates q and k in place (views of the fused qkv output included) and returns them."""
        return lk.rotary_embedding(positions, q, k, self.cos_sin_cache, self.is_neox)
