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


@dataclass
class Case:
    op: str
    name: str
    args: tuple
    kwargs: dict = field(default_factory=dict)
    baseline: Callable | None = None  # the best plain-PyTorch way to get the same result
    baseline_name: str = "eager"
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


def _attention(device, dtype, s):
    hq, hk = max(1, HQ // s), max(1, HK // s)
    for batch, seqlen in [(1, 4096 // s), (8, 1024 // s)]:
        q = _randn(batch * seqlen, hq, D, device=device, dtype=dtype)
        k = _randn(batch * seqlen, hk, D, device=device, dtype=dtype)
        v = _randn(batch * seqlen, hk, D, device=device, dtype=dtype)
        cu = torch.arange(0, batch + 1, device=device, dtype=torch.int32) * seqlen

        def sdpa(q=q, k=k, v=v, b=batch, n=seqlen):
            # [B, H, L, D] views; K/V heads repeated: the widest-supported SDPA call across torch versions
            qq = q.view(b, n, hq, D).transpose(1, 2)
            kk = k.view(b, n, hk, D).transpose(1, 2).repeat_interleave(hq // hk, dim=1)
            vv = v.view(b, n, hk, D).transpose(1, 2).repeat_interleave(hq // hk, dim=1)
            return F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)

        yield Case("flash_attention", f"prefill_B{batch}_L{seqlen}_causal",
                   (q, k, v, cu, cu, seqlen, seqlen, True), baseline=sdpa, baseline_name="SDPA",
                   flops=4 * batch * hq * D * seqlen * seqlen / 2, bound="compute")
    bs, ctx = 16, 4096 // s
    for batch in sorted({1, 16, 64 // s or 1, 256 // s}):
        blocks = math.ceil(ctx / bs)
        k_cache = _randn(batch * blocks + 1, bs, hk, D, device=device, dtype=dtype)
        v_cache = _randn(batch * blocks + 1, bs, hk, D, device=device, dtype=dtype)
        block_tables = torch.randperm(batch * blocks, device=device).view(batch, blocks).int()
        seq_lens = torch.full((batch,), ctx, device=device, dtype=torch.int32)
        cu_q = torch.arange(batch + 1, device=device, dtype=torch.int32)
        q = _randn(batch, hq, D, device=device, dtype=dtype)
        kc, vc = _randn(batch, hk, ctx, D, device=device, dtype=dtype), _randn(batch, hk, ctx, D, device=device, dtype=dtype)

        def sdpa_decode(q=q, kc=kc, vc=vc):
            # Contiguous K/V (no paging): a baseline that is easier than the real job.
            rep = hq // hk
            return F.scaled_dot_product_attention(q.unsqueeze(2), kc.repeat_interleave(rep, 1),
                                                  vc.repeat_interleave(rep, 1))

        yield Case("paged_attention", f"decode_B{batch}_ctx{ctx}",
                   (q, k_cache, v_cache, block_tables, seq_lens, cu_q, 1, ctx),
                   baseline=sdpa_decode, baseline_name="SDPA (contiguous KV)",
                   bytes=2 * batch * ctx * hk * D * q.element_size())


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
    for n, k in [(6144 // s, HIDDEN // s), (2 * INTER // s, HIDDEN // s), (HIDDEN // s, INTER // s)]:
        w = _randn(n, k, device=device, dtype=dtype) * 0.02
        for bits, group in [(4, 128), (8, None)]:
            if group is not None and k % group:
                continue
            qw = lk.quantize(w, bits=bits, group_size=group)
            for m in sorted({1, 16, 256 // s}):
                x = _randn(m, k, device=device, dtype=dtype)
                wbytes = n * k * bits / 8 + n * (k // (group or k)) * 2 * x.element_size()
                yield Case("quant_matmul", f"W{bits}A16_g{group}_M{m}_N{n}_K{k}", (x, qw),
                           baseline=lambda x=x, w=w: x @ w.T, baseline_name="fp16 matmul",
                           bytes=wbytes + (m * k + m * n) * x.element_size(),
                           flops=2 * m * n * k, bound="memory" if m <= 16 else "compute")


def cases(device: str, dtype: torch.dtype, scale: int = 1, ops: set[str] | None = None):
    """Every case, lazily (so only one case's inputs live on the device at a time)."""
    for gen in (_elementwise, _attention, _cache_ops, _quant):
        for case in gen(device, dtype, scale):
            if ops is None or case.op in ops:
                yield case
