"""Cases of the GPU suite: each op at LLM-sized shapes (Llama-3-8B: hidden 4096, 32 query / 8 kv
heads, head_dim 128, intermediate 14336), with the bytes and FLOPs that bound it.

A case builds fresh random inputs (never zeros: they hide unwritten outputs and can run faster),
names the PyTorch baseline to beat, and states its floor: `bytes` it must move at least once and
`flops` it must do. The suite turns measured times into GB/s or TFLOP/s against the machine's
measured ceilings. `scale` shrinks every shape for the CPU smoke run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

import lepton_kernels as lk

HIDDEN, HQ, HK, D, INTER = 4096, 32, 8, 128, 14336
DECODE_CONTEXT = 32768        # KV tokens per decode batch, however many sequences share them
QUANT_M = (1, 4, 16, 64, 256)


@dataclass
class Case:
    op: str
    name: str
    args: tuple
    kwargs: dict = field(default_factory=dict)
    baseline: Callable | None = None  # the best plain-PyTorch way to get the same result
    baseline_name: str = "eager"
    baseline_view: Callable | None = None  # baseline output -> the op's layout (checked, not timed)
    bytes: float = 0.0
    flops: float = 0.0
    bound: str = "memory"  # which ceiling the op should approach


def _randn(*shape, device, dtype):
    return torch.randn(*shape, device=device, dtype=dtype)


def _elementwise(device, dtype, s):
    tokens = [max(1, 256 // s), max(1, 4096 // s)]
    hid, inter = HIDDEN // s, INTER // s
    for t in tokens:
        x, r = _randn(t, hid, device=device, dtype=dtype), _randn(t, hid, device=device, dtype=dtype)
        w, b = _randn(hid, device=device, dtype=dtype), _randn(hid, device=device, dtype=dtype)
        e = x.element_size()
        yield Case("rms_norm", f"T{t}_H{hid}_residual", (x, w, 1e-6), {"residual": r},
                   bytes=(4 * t * hid + hid) * e)
        yield Case("layer_norm", f"T{t}_H{hid}_residual", (x, w, b, 1e-5), {"residual": r},
                   bytes=(4 * t * hid + 2 * hid) * e)
        g = _randn(t, 2 * inter, device=device, dtype=dtype)
        yield Case("silu_and_mul", f"T{t}_I{inter}", (g,), baseline=lambda g=g, i=inter:
                   F.silu(g[:, :i]) * g[:, i:], baseline_name="F.silu*", bytes=3 * t * inter * e)
        yield Case("gelu_and_mul", f"T{t}_I{inter}_tanh", (g,), {"approximate": "tanh"},
                   bytes=3 * t * inter * e)
        hq, hk = max(1, HQ // s), max(1, HK // s)
        q, k = _randn(t, hq, D, device=device, dtype=dtype), _randn(t, hk, D, device=device, dtype=dtype)
        pos = torch.randint(0, 8192, (t,), device=device)
        freqs = torch.outer(torch.arange(8192.0), 500000.0 ** (-torch.arange(0, D, 2) / D))
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device=device, dtype=torch.float32)
        yield Case("rotary_embedding", f"T{t}_q{hq}_k{hk}_D{D}", (pos, q, k, cache, True),
                   bytes=2 * t * (hq + hk) * D * e + t * D * 4)


def sdpa_flash(q, k, v, causal: bool):
    """GQA-native SDPA (``enable_gqa``: K/V heads are never repeated) on [B, H, L, D] views; on a
    GPU pinned to the FlashAttention backend, as the prefill baseline the issue names."""
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def _attention(device, dtype, s):
    hq, hk = max(1, HQ // s), max(1, HK // s)
    # Prefill target: bf16, D 128, 4k tokens, causal, >= 1.0x SDPA (case prefill_B1_L4096_causal).
    for batch, seqlen in [(1, 4096 // s), (8, 1024 // s)]:
        q = _randn(batch * seqlen, hq, D, device=device, dtype=dtype)
        k = _randn(batch * seqlen, hk, D, device=device, dtype=dtype)
        v = _randn(batch * seqlen, hk, D, device=device, dtype=dtype)
        cu = torch.arange(0, batch + 1, device=device, dtype=torch.int32) * seqlen
        # [B, H, L, D] views of the same memory: no copy inside the timed region.
        qv, kv, vv = (t.view(batch, seqlen, -1, D).transpose(1, 2) for t in (q, k, v))
        yield Case("flash_attention", f"prefill_B{batch}_L{seqlen}_causal",
                   (q, k, v, cu, cu, seqlen, seqlen, True),
                   baseline=lambda qv=qv, kv=kv, vv=vv: sdpa_flash(qv, kv, vv, True),
                   baseline_name="SDPA flash (enable_gqa)",
                   baseline_view=lambda o: o.transpose(1, 2).reshape(-1, o.shape[1], D),
                   flops=4 * batch * hq * D * seqlen * seqlen / 2, bound="compute")
    # Decode: 32k tokens of context per batch, split over B sequences (L2 cannot hold the KV).
    bs, total = 16, DECODE_CONTEXT // s
    for batch in (1, 4, 16, 64):
        ctx = total // batch
        blocks = math.ceil(ctx / bs)
        k_cache = _randn(batch * blocks + 1, bs, hk, D, device=device, dtype=dtype)
        v_cache = _randn(batch * blocks + 1, bs, hk, D, device=device, dtype=dtype)
        block_tables = torch.randperm(batch * blocks, device=device).view(batch, blocks).int()
        seq_lens = torch.full((batch,), ctx, device=device, dtype=torch.int32)
        cu_q = torch.arange(batch + 1, device=device, dtype=torch.int32)
        q = _randn(batch, hq, D, device=device, dtype=dtype)
        # The same K/V gathered into contiguous [B, Hk, ctx, D] once, outside the timed region.
        kc, vc = (c[block_tables.long()].flatten(1, 2)[:, :ctx].transpose(1, 2).contiguous()
                  for c in (k_cache, v_cache))
        yield Case("paged_attention", f"decode_B{batch}_ctx{ctx}",
                   (q, k_cache, v_cache, block_tables, seq_lens, cu_q, 1, ctx),
                   baseline=lambda q=q, kc=kc, vc=vc: sdpa_flash(q.unsqueeze(2), kc, vc, False),
                   baseline_name="SDPA flash (enable_gqa, contiguous KV)",
                   baseline_view=lambda o: o.squeeze(2),
                   bytes=2 * batch * ctx * hk * D * q.element_size() + 2 * q.numel() * q.element_size())


def _cache_ops(device, dtype, s):
    hk, bs = max(1, HK // s), 16
    for tokens in [256 // s, 4096 // s]:
        k, v = _randn(tokens, hk, D, device=device, dtype=dtype), _randn(tokens, hk, D, device=device, dtype=dtype)
        nb = tokens // bs + 64
        k_cache = _randn(nb, bs, hk, D, device=device, dtype=dtype)
        v_cache = _randn(nb, bs, hk, D, device=device, dtype=dtype)
        slots = torch.randperm(nb * bs, device=device)[:tokens]
        yield Case("reshape_and_cache", f"T{tokens}_Hk{hk}_D{D}", (k, v, k_cache, v_cache, slots),
                   bytes=4 * tokens * hk * D * k.element_size())
    layers, pairs, nb = max(1, 32 // s), 256 // s, 1024 // s
    kcs = [_randn(nb, bs, hk, D, device=device, dtype=dtype) for _ in range(layers)]
    vcs = [_randn(nb, bs, hk, D, device=device, dtype=dtype) for _ in range(layers)]
    perm = torch.randperm(nb, device=device)
    mapping = torch.stack([perm[:pairs], perm[pairs:2 * pairs]], dim=1).long()
    yield Case("copy_blocks", f"L{layers}_pairs{pairs}", (kcs, vcs, mapping),
               bytes=2 * 2 * layers * pairs * bs * hk * D * kcs[0].element_size())


def _quant(device, dtype, s):
    """W4A16 / W8A16 against cuBLAS fp16: F.linear on the dequantized fp16 weight (the smoke run
    keeps its fp32). Goals: W4A16 >= 3x at M <= 16 (memory bound: a quarter of the bytes)."""
    dtype = torch.float16 if device == "cuda" else dtype
    for n, k in [(6144 // s, HIDDEN // s), (2 * INTER // s, HIDDEN // s), (HIDDEN // s, INTER // s)]:
        w = _randn(n, k, device=device, dtype=dtype) * 0.02
        for bits, group in [(4, 128), (8, None)]:
            if group is not None and k % group:
                continue
            qw = lk.quantize(w, bits=bits, group_size=group)
            w16 = lk.dequantize(qw).to(dtype)     # what cuBLAS multiplies: same values as qw
            for m in QUANT_M:
                x = _randn(m, k, device=device, dtype=dtype)
                wbytes = n * k * bits / 8 + n * (k // (group or k)) * 2 * x.element_size()
                yield Case("quant_matmul", f"W{bits}A16_g{group}_M{m}_N{n}_K{k}", (x, qw),
                           baseline=lambda x=x, w16=w16: F.linear(x, w16),
                           baseline_name=f"cuBLAS {'fp16' if device == 'cuda' else 'fp32'} F.linear",
                           bytes=wbytes + (m * k + m * n) * x.element_size(),
                           flops=2 * m * n * k, bound="memory" if m <= 16 else "compute")


def _sampling(device, dtype, s):
    """Top-k/top-p draw over a Llama-3 vocabulary (probabilities are float32 whatever the model
    dtype): one read of the probability rows is the floor."""
    vocab = 128256 // s
    for rows in sorted({1, 64 // s}):
        probs = torch.softmax(3 * _randn(rows, vocab, device=device, dtype=torch.float32), dim=-1)
        keys = torch.randint(-2**62, 2**62, (rows,), device=device)
        top_k = torch.full((rows,), 50, device=device)
        top_p = torch.full((rows,), 0.9, device=device)
        yield Case("sample_from_probs", f"R{rows}_V{vocab}_topk50_topp0.9", (probs, top_k, top_p, None, keys),
                   bytes=rows * vocab * 4)


def cases(device: str, dtype: torch.dtype, scale: int = 1, ops: set[str] | None = None):
    """Every case, lazily (so only one case's inputs live on the device at a time)."""
    for gen in (_attention, _quant, _elementwise, _cache_ops, _sampling):   # the targets first
        for case in gen(device, dtype, scale):
            if ops is None or case.op in ops:
                yield case
