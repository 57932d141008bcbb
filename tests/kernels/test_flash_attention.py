"""flash_attention against a float64 loop with masks built entry by entry, and against
torch's scaled_dot_product_attention run sequence by sequence (K/V heads repeated for GQA,
bottom-right causal mask built with tril/triu).

Tolerance (flash-attention's rule): an implementation's max error against the float64 reference
may be at most twice the error of PyTorch's own SDPA in the same dtype, plus a small floor."""

import math

import pytest
import torch
import torch.nn.functional as F

import lepton_kernels

IMPLS = ["eager", "triton"]
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}

# name -> (q lens, k lens): self-attention, queries after a prefix, more queries than keys, and
# a ragged batch with one-token and empty sequences (repeated cu_seqlens values)
SEQS = {
    "self": ([1, 16, 17, 37], [1, 16, 17, 37]),
    "prefix": ([1, 5, 17], [16, 37, 17]),
    "q_gt_k": ([5, 3, 2], [2, 3, 9]),
    "ragged": ([1, 0, 0, 40, 1, 33], [1, 0, 6, 40, 19, 33]),
}
HEADS = [(2, 2), (8, 2), (7, 1), (12, 4), (8, 1)]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """These tensors are tiny: intra-op threads only cost spin-waits on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def poison_new_tensors(monkeypatch):
    """torch.empty / empty_like return NaN-filled floating tensors during the test, so an
    output element (or a split-KV partial) that a kernel forgets to write shows up as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(empty_like(*a, **k)))


def visible_mask(lq, lk, causal, window):
    """mask[i, j]: query i (key position i + lk - lq) may see key j; decided entry by entry."""
    def visible(i, j):
        p = i + lk - lq
        if causal:
            return j <= p and (window is None or j >= p - window + 1)
        return window is None or abs(j - p) <= window - 1
    return torch.tensor([[visible(i, j) for j in range(lk)] for i in range(lq)],
                        dtype=torch.bool).reshape(lq, lk)


def reference(q, k, v, q_lens, k_lens, causal, scale=None, window=None):
    """float64 attention: a loop over sequences and query heads, softmax by hand."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    scale = 1 / math.sqrt(q.shape[2]) if scale is None else scale
    out = torch.zeros_like(q)
    q0 = k0 = 0
    for lq, lk in zip(q_lens, k_lens):
        mask = visible_mask(lq, lk, causal, window)
        for h in range(q.shape[1]):
            s = q[q0:q0 + lq, h] @ k[k0:k0 + lk, h // group].T * scale
            s = torch.where(mask, s, torch.full_like(s, -math.inf))
            m = s.max(dim=1, keepdim=True).values if lk else s.sum(dim=1, keepdim=True)
            e = torch.where(mask, torch.exp(s - torch.nan_to_num(m, neginf=0.0)), 0.0)
            denom = e.sum(dim=1, keepdim=True)
            out[q0:q0 + lq, h] = (e / torch.where(denom > 0, denom, 1.0)) @ v[k0:k0 + lk, h // group]
        q0, k0 = q0 + lq, k0 + lk
    return out


def sdpa(q, k, v, q_lens, k_lens, causal, scale=None, window=None):
    """torch SDPA per sequence in the inputs' dtype; rows that see no key are set to zero."""
    group = q.shape[1] // k.shape[1]
    outs, q0, k0 = [], 0, 0
    for lq, lk in zip(q_lens, k_lens):
        ones = torch.ones(lq, lk, dtype=torch.bool)
        if causal:
            mask = ones.tril(lk - lq)
            if window is not None:
                mask &= ones.triu(lk - lq - window + 1)
        else:
            mask = ones if window is None else ones.tril(lk - lq + window - 1).triu(lk - lq - window + 1)
        qs = q[q0:q0 + lq].transpose(0, 1)
        ks = k[k0:k0 + lk].repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v[k0:k0 + lk].repeat_interleave(group, dim=1).transpose(0, 1)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale).transpose(0, 1)
        outs.append(torch.where(mask.any(dim=1)[:, None, None], o, torch.zeros_like(o)))
        q0, k0 = q0 + lq, k0 + lk
    return torch.cat(outs)


def cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def make(q_lens, k_lens, hq, hk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), hq, d, generator=g).to(dtype)
    k = torch.randn(sum(k_lens), hk, d, generator=g).to(dtype)
    v = torch.randn(sum(k_lens), hk, d, generator=g).to(dtype)
    return q, k, v


def run(impl, q, k, v, q_lens, k_lens, causal, **kwargs):
    with lepton_kernels.use(flash_attention=impl):
        return lepton_kernels.flash_attention(q, k, v, cu(q_lens).to(q.device), cu(k_lens).to(q.device),
                                              max(q_lens), max(k_lens), causal, **kwargs)


def check(out, q, k, v, q_lens, k_lens, causal, **kwargs):
    """The flash-attention tolerance rule against float64, plus a direct SDPA comparison that
    also allows one rounding of the output (rtol eps: two roundings may differ by an ulp)."""
    assert out.dtype == q.dtype and out.shape == q.shape
    assert not out.isnan().any(), "unwritten or NaN output rows"
    ref = reference(q, k, v, q_lens, k_lens, causal, kwargs.get("scale"), kwargs.get("sliding_window"))
    torch_out = sdpa(q, k, v, q_lens, k_lens, causal, kwargs.get("scale"), kwargs.get("sliding_window"))
    torch_err = (torch_out.double() - ref).abs().max().item()
    err = (out.double() - ref).abs().max().item()
    assert err <= 2 * torch_err + FLOOR[q.dtype], f"max error {err:.3g}, torch's {torch_err:.3g}"
    torch.testing.assert_close(out.double(), torch_out.double(), atol=2 * torch_err + 2 * FLOOR[q.dtype],
                               rtol=torch.finfo(q.dtype).eps)


# What the Triton interpreter runs by default (each feature at least twice); the whole grid
# runs for triton under `pytest -m slow`.
TRITON_FAST = {
    torch.float32: {"self-8:2-d80-causal", "self-2:2-d64-full-w8", "prefix-7:1-d64-causal-w8",
                    "prefix-8:2-d80-full", "q_gt_k-7:1-d80-causal-w8", "q_gt_k-2:2-d64-full",
                    "ragged-12:4-d80-causal", "ragged-8:1-d64-full-w8"},
    torch.float16: {"self-7:1-d80-causal-w8", "prefix-8:2-d64-causal", "q_gt_k-2:2-d80-full",
                    "ragged-8:1-d80-causal-w8", "ragged-12:4-d64-causal"},
}


def grid(dtype):
    for seqs in SEQS:
        for hq, hk in HEADS:
            for d in (80, 64):
                for causal in (True, False):
                    for window in (None, 8):
                        name = (f"{seqs}-{hq}:{hk}-d{d}-{'causal' if causal else 'full'}"
                                f"{'' if window is None else f'-w{window}'}")
                        for impl in IMPLS:
                            fast = impl == "eager" and dtype == torch.float32 or name in TRITON_FAST[dtype]
                            yield pytest.param(impl, seqs, hq, hk, d, causal, window, id=f"{impl}-{name}",
                                               marks=() if fast else pytest.mark.slow)


@pytest.mark.parametrize("impl,seqs,hq,hk,d,causal,window", list(grid(torch.float32)))
def test_matches_references_fp32(impl, seqs, hq, hk, d, causal, window):
    q_lens, k_lens = SEQS[seqs]
    q, k, v = make(q_lens, k_lens, hq, hk, d, torch.float32)
    out = run(impl, q, k, v, q_lens, k_lens, causal, sliding_window=window)
    check(out, q, k, v, q_lens, k_lens, causal, sliding_window=window)


@pytest.mark.parametrize("impl,seqs,hq,hk,d,causal,window", list(grid(torch.float16)))
def test_matches_references_fp16(impl, seqs, hq, hk, d, causal, window):
    q_lens, k_lens = SEQS[seqs]
    q, k, v = make(q_lens, k_lens, hq, hk, d, torch.float16, seed=1)
    out = run(impl, q, k, v, q_lens, k_lens, causal, sliding_window=window)
    check(out, q, k, v, q_lens, k_lens, causal, sliding_window=window)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs a GPU (interpreter gap)")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seqs,hq,hk,d,causal,window", [
    ("self", 8, 2, 128, True, None), ("prefix", 7, 1, 80, True, 8), ("q_gt_k", 4, 4, 64, False, None),
    ("ragged", 12, 4, 96, True, 16), ("ragged", 8, 1, 256, True, None), ("prefix", 4, 2, 256, False, 8)])
def test_matches_references_bf16_cuda(impl, seqs, hq, hk, d, causal, window):
    q_lens, k_lens = SEQS[seqs]
    q, k, v = make(q_lens, k_lens, hq, hk, d, torch.bfloat16, seed=3)
    out = run(impl, *(t.cuda() for t in (q, k, v)), q_lens, k_lens, causal, sliding_window=window)
    check(out.cpu(), q, k, v, q_lens, k_lens, causal, sliding_window=window)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("window", [1, 2, 15, 16, 17, 32, 33])
def test_sliding_window_edges(impl, causal, window):
    # The interpreter's tiles are 32 queries x 16 keys: windows ending on, just before and just
    # after a key tile boundary; the 64/80 sequence puts every query block on tile boundaries.
    q_lens, k_lens = [37, 4, 64], [37, 35, 80]
    q, k, v = make(q_lens, k_lens, 2, 1, 64, torch.float32, seed=6)
    out = run(impl, q, k, v, q_lens, k_lens, causal, sliding_window=window)
    check(out, q, k, v, q_lens, k_lens, causal, sliding_window=window)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_key_tiles_before_the_window_are_never_read(causal):
    # Queries at key positions 80..99 with a window of 8 see keys >= 73, so the tiles of keys
    # 0..63 lie wholly outside every window: NaN there reaches the output only if they are read.
    q_lens, k_lens = [20, 3], [100, 3]
    q, k, v = make(q_lens, k_lens, 4, 2, 64, torch.float32, seed=7)
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[:64], v_nan[:64] = float("nan"), float("nan")
    out = run("triton", q, k_nan, v_nan, q_lens, k_lens, causal, sliding_window=8)
    check(out, q, k, v, q_lens, k_lens, causal, sliding_window=8)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("d,dtype", [(96, torch.float32), (128, torch.float32), (96, torch.float16),
                                     (256, torch.float32), (256, torch.float16)])
def test_other_head_dims(impl, d, dtype):
    q_lens, k_lens = [3, 17, 0], [20, 17, 4]
    q, k, v = make(q_lens, k_lens, 4, 2, d, dtype, seed=4)
    for causal, window in ((True, None), (False, 5)):
        out = run(impl, q, k, v, q_lens, k_lens, causal, sliding_window=window)
        check(out, q, k, v, q_lens, k_lens, causal, sliding_window=window)


def gpu_tile_configs():
    """Every entry of the GPU launch tables (each tier, head dim, dtype, short / long prefill)."""
    from lepton_kernels.triton_kernels import flash_attention_config as fc
    seen = {}
    for tier in fc.HALF_CONFIGS:
        for block_d in (64, 128, 256):
            for dtype in (torch.float16, torch.float32):
                for max_q in (fc.SHORT_Q, fc.SHORT_Q + 1):
                    cfg = fc.table_config(tier, block_d, dtype, max_q)
                    seen.setdefault((block_d, dtype, cfg), f"{tier}-d{block_d}-{str(dtype)[6:]}-q{max_q}")
    return [pytest.param(*key, id=name) for key, name in seen.items()]


@pytest.mark.parametrize("block_d,dtype,cfg", gpu_tile_configs())
def test_gpu_tile_configs_under_the_interpreter(monkeypatch, block_d, dtype, cfg):
    # The kernel with each GPU table's tiles: several query blocks, bottom-right causal after a
    # prefix, windows ending on a key tile boundary, one-token and empty sequences.
    import lepton_kernels.triton_kernels.flash_attention as kernel
    monkeypatch.setattr(kernel, "launch_config", lambda *args: cfg)
    d = {64: 64, 128: 80 if dtype == torch.float32 else 128, 256: 256}[block_d]
    m, n = cfg.block_m, cfg.block_n
    q_lens, k_lens = [1, 0, 2 * m + 5, m - 3], [1, 3, 2 * m + 5 + n, m - 3]
    q, k, v = make(q_lens, k_lens, 2, 1, d, dtype, seed=8)
    for causal, window in ((True, None), (True, n), (False, 2 * n + 1)):
        out = run("triton", q, k, v, q_lens, k_lens, causal, sliding_window=window)
        check(out, q, k, v, q_lens, k_lens, causal, sliding_window=window)


def test_unsupported_head_dim_falls_back_to_eager():
    q, k, v = make([5], [5], 2, 1, 59, torch.float32)
    args = (q, k, v, cu([5]), cu([5]), 5, 5, True)
    assert lepton_kernels.flash_attention.select(*args) == "eager"
    with lepton_kernels.use(flash_attention="triton"), pytest.raises(
            lepton_kernels.KernelUnavailableError, match="head_dim 59"):
        lepton_kernels.flash_attention(*args)
    check(lepton_kernels.flash_attention(*args), q, k, v, [5], [5], True)


@pytest.mark.parametrize("impl", IMPLS)
def test_scale_empty_sequences_and_zero_rows(impl):
    # A sequence without queries, one without keys (its rows are zeros), one longer in q than k.
    q_lens, k_lens = [0, 3, 4, 6], [5, 0, 4, 2]
    q, k, v = make(q_lens, k_lens, 4, 2, 64, torch.float32, seed=2)
    out = run(impl, q, k, v, q_lens, k_lens, True, scale=0.3)
    check(out, q, k, v, q_lens, k_lens, True, scale=0.3)
    assert out[:3].abs().max() == 0 and out[7:11].abs().max() == 0 and out[11:].abs().max() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_views_of_fused_qkv_are_read_in_place(impl):
    # q, k, v as head slices of one [T, Hq + 2 Hk, D] projection, as a model produces them.
    qkv = torch.randn(16, 8, 64, generator=torch.Generator().manual_seed(5))
    q, k, v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
    before = qkv.clone()
    out = run(impl, q, k, v, [7, 9], [7, 9], True)
    assert torch.equal(qkv, before)
    check(out, q, k, v, [7, 9], [7, 9], True)


def _bad_calls():
    q, k, v = make([3, 4], [3, 4], 4, 2, 64, torch.float32)
    cq, ck = cu([3, 4]), cu([3, 4])
    good = dict(q=q, k=k, v=v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=4, max_seqlen_k=4,
                causal=True)
    yield "q", dict(good, q=q[0])
    yield "k", dict(good, k=k.unsqueeze(0))
    yield "dtype", dict(good, v=v.half())
    yield "v shape", dict(good, v=v[:, :1])
    yield "head_dim", dict(good, k=k[..., :32], v=v[..., :32])
    yield "multiple of k heads", dict(good, q=q[:, :3])
    yield "cu_seqlens_q", dict(good, cu_seqlens_q=cq.long())
    yield "cu_seqlens_k", dict(good, cu_seqlens_k=torch.tensor([0, 7], dtype=torch.int32))
    yield "cu_seqlens_q", dict(good, cu_seqlens_q=torch.tensor([0, 3, 8], dtype=torch.int32),
                               max_seqlen_q=5)
    yield "cu_seqlens_k", dict(good, cu_seqlens_k=torch.tensor([0, 3, 6], dtype=torch.int32))
    yield "cu_seqlens_q", dict(good, cu_seqlens_q=torch.tensor([1, 3, 7], dtype=torch.int32))
    yield "non-decreasing", dict(good, cu_seqlens_q=torch.tensor([0, 8, 7], dtype=torch.int32),
                                 max_seqlen_q=9)
    yield "max_seqlen_q", dict(good, max_seqlen_q=3)
    yield "max_seqlen_k", dict(good, max_seqlen_k=-1)
    yield "causal", dict(good, causal=1)
    yield "scale", dict(good, scale=float("nan"))
    yield "sliding_window", dict(good, sliding_window=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("match,kwargs", list(_bad_calls()), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_inputs_raise_value_error(impl, match, kwargs):
    with lepton_kernels.use(flash_attention=impl), pytest.raises(ValueError, match=match):
        lepton_kernels.flash_attention(**kwargs)
