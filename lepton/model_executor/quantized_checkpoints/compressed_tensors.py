"""compressed-tensors ``pack-quantized`` tensors of one projection -> lepton's QuantizedWeight.

The published layout (compressed-tensors' PackedQuantizationCompressor.compress with
pack_to_int32, compressed_tensors/compressors/pack_quantized/; vLLM's CompressedTensorsWNA16
reads the same), N outputs, K inputs, B = 4 or 8 bits (P = 32 / B codes per int32 word),
G groups (K / group_size; 1 for strategy "channel"):

    weight_packed      int32 [N, K / P]     code of input k in bits B*(k % P) .. of word [n, k // P]
    weight_scale       float [N, G]         the checkpoint's dtype
    weight_shape       integer [2]          (N, K)
    weight_zero_point  int32 [ceil(N / P), G]   asymmetric only, packed along the outputs
                                                (pack_to_int32(zero_point, B, packed_dim=0))

Codes and zero points are signed, q and z in [-2^(B-1), 2^(B-1)), and stored offset by
2^(B-1) (pack_to_int32's "convert to unsigned range"). Their dequantize
(compressed_tensors/quantization/lifecycle/forward.py) computes, with z = 0 when symmetric,

    W[n, k] = (q[n, k] - z[n, k // g]) * s[n, k // g]

Into lepton's layout (lepton_kernels/ops/quantize.py), both offsets cancel in q - z:
  4-bit: weight_packed is already lepton's int4 packing (eight inputs along K per word, lowest
         input in the lowest bits), kept as is; zeros are the stored zero points (z + 8), or 8
         for every group of a symmetric checkpoint.
  8-bit: codes stored - 128 = q as int8; zeros z as int8, or None when symmetric; symmetric
         "channel" becomes lepton's per-channel int8 (scales [N], no groups).
"""

from __future__ import annotations

import torch

from lepton_kernels.ops.quantize import QuantizedWeight

from .gptq import check_tensor, lepton_group_size, unpack_cols, unpack_rows

SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")


def required_suffixes(spec) -> set[str]:
    """The tensors every quantized projection has (the zero point only when asymmetric)."""
    return {"weight_packed", "weight_scale", "weight_shape"} | (
        set() if spec.sym else {"weight_zero_point"})


def check_shape(name: str, shape: torch.Tensor, n: int, k: int) -> None:
    """weight_shape must say (N, K) of the layer it is loaded into."""
    if shape.is_floating_point() or shape.numel() != 2 or shape.flatten().tolist() != [n, k]:
        raise ValueError(f"checkpoint tensor {name!r} must be the integers [{n}, {k}] "
                         f"(outputs, inputs of the layer), got {shape.flatten().tolist()}")


def compressed_tensors_weight(prefix: str, tensors: dict[str, torch.Tensor], spec, n: int, k: int,
                              dtype: torch.dtype) -> QuantizedWeight:
    """``tensors`` (weight_packed, weight_scale, weight_shape and, when asymmetric,
    weight_zero_point) of projection ``prefix`` with n outputs and k inputs -> QuantizedWeight."""
    bits, pack = spec.bits, 32 // spec.bits
    groups = 1 if spec.group_size == -1 else k // spec.group_size
    if k % pack or (spec.group_size != -1 and k % spec.group_size):
        raise ValueError(f"{prefix}: {k} inputs do not fit pack-quantized's packing "
                         f"({pack} codes per word, group_size {spec.group_size})")
    # Symmetric 8-bit "channel" is lepton's own int8 layout; with zero points it stays one group
    # per row, the layout GPTQ 8-bit group_size -1 also takes.
    per_channel = bits == 8 and spec.group_size == -1 and spec.sym
    group = None if per_channel else lepton_group_size(prefix, k, groups, spec.group_size)
    check_shape(f"{prefix}.weight_shape", tensors["weight_shape"], n, k)
    check_tensor(f"{prefix}.weight_packed", tensors["weight_packed"], (n, k // pack), integer=True)
    check_tensor(f"{prefix}.weight_scale", tensors["weight_scale"], (n, groups), integer=False)
    scales = tensors["weight_scale"].float().contiguous()               # [N, G]
    zeros = None
    if not spec.sym:
        check_tensor(f"{prefix}.weight_zero_point", tensors["weight_zero_point"],
                     (-(-n // pack), groups), integer=True)
        zeros = unpack_rows(tensors["weight_zero_point"], bits)[:n]    # [N, G], stored z + 2^(B-1)
    if bits == 4:
        if zeros is None:
            zeros = torch.full((n, groups), 8, dtype=torch.int32, device=scales.device)
        return QuantizedWeight(tensors["weight_packed"].contiguous(), scales,
                               zeros.to(torch.uint8).contiguous(), 4, group, (n, k), dtype)
    q = (unpack_cols(tensors["weight_packed"], 8) - 128).to(torch.int8)     # [N, K]
    if zeros is not None:
        zeros = (zeros - 128).to(torch.int8).contiguous()
    if per_channel:
        scales = scales[:, 0].contiguous()
    return QuantizedWeight(q.contiguous(), scales, zeros, 8, group, (n, k), dtype)
