"""AWQ (GEMM version) tensors of one projection -> lepton's QuantizedWeight.

The published layout (AutoAWQ's WQLinear_GEMM.from_linear, vLLM's awq loader), K inputs, N
outputs, groups of g along K, 4 bits:

    qweight  int32 [K, N / 8]      eight codes along N per word, interleaved:
                                   nibble i (bits 4i .. 4i+3) of word [k, c] = q[k, 8c + ORDER[i]]
    qzeros   int32 [K / g, N / 8]  the zero points, packed the same way
    scales   float16 [K / g, N]
    ORDER = (0, 2, 4, 6, 1, 3, 5, 7)   (so the GEMM kernel's shifts land pairs of outputs together)

    W[n, k] = (q[k, n] - z[k // g, n]) * scales[k // g, n]

No offset on the zeros (unlike GPTQ v1) and no input permutation.
"""

from __future__ import annotations

import torch

from lepton_kernels.ops.quantize import QuantizedWeight, pack_int4

from .gptq import check_tensor, unpack_cols

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Column j of a run of eight is nibble UNDO[j]: UNDO[ORDER[i]] = i.
UNDO = tuple(AWQ_ORDER.index(j) for j in range(8))


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] -> int32 [R, 8C] codes in column order (AWQ's interleave undone)."""
    nibbles = unpack_cols(packed, 4).view(packed.shape[0], -1, 8)
    undo = torch.tensor(UNDO, device=packed.device)
    return nibbles.index_select(2, undo).reshape(packed.shape[0], -1)


def awq_weight(prefix: str, tensors: dict[str, torch.Tensor], spec, n: int, k: int,
               dtype: torch.dtype) -> QuantizedWeight:
    """``tensors`` (qweight, qzeros, scales) of the projection ``prefix`` -> QuantizedWeight."""
    group = spec.group_size
    if n % 8 or k % group:
        raise ValueError(f"{prefix}: {n} outputs and {k} inputs do not fit AWQ's packing "
                         f"(outputs a multiple of 8, inputs of group_size {group})")
    groups = k // group
    check_tensor(f"{prefix}.qweight", tensors["qweight"], (k, n // 8), integer=True)
    check_tensor(f"{prefix}.qzeros", tensors["qzeros"], (groups, n // 8), integer=True)
    check_tensor(f"{prefix}.scales", tensors["scales"], (groups, n), integer=False)
    q = unpack_awq(tensors["qweight"])                      # [K, N]
    zeros = unpack_awq(tensors["qzeros"])                   # [G, N]
    return QuantizedWeight(pack_int4(q.T.contiguous()), tensors["scales"].float().T.contiguous(),
                           zeros.T.to(torch.uint8).contiguous(), 4, group, (n, k), dtype)
