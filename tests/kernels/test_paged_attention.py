"""paged_attention against attention on the same K/V laid out contiguously: the float64 loop
and the per-sequence SDPA of test_flash_attention, both causal with bottom-right alignment.

The test writes the cache itself with plain indexing: shuffled (non-contiguous) block tables,
block size 16 with partly filled last blocks, table entries past the last block padded with -1,
and every slot no sequence owns filled with NaN, so reading one shows up in the output."""

import pytest
import torch

import lepton_kernels

from .test_flash_attention import (  # noqa: F401 (autouse fixtures)
    check, make, poison_new_tensors, single_thread)

IMPLS = ["eager", "triton"]
BLOCK_SIZE = 16

# name -> (q lens, seq lens): the new tokens of sequence b are its last q_len positions
CASES = {
    "decode": ([1, 1, 1, 1], [1, 16, 17, 37]),
    "chunked_prefill": ([16, 17], [16, 37]),
    "prefix_prefill": ([5, 37], [21, 37]),
    "mixed": ([1, 17, 1, 4], [37, 17, 1, 20]),
}
HEADS = [(2, 2), (8, 2), (7, 1)]


def paged_inputs(q_lens, seq_lens, hq, hk, d, dtype, seed=0, spare_blocks=3):
    """(q, k, v) with k/v holding every sequence's full context contiguously, and the same
    K/V scattered into a NaN-filled paged cache through a shuffled block table."""
    q, _, _ = make(q_lens, seq_lens, hq, hk, d, dtype, seed)
    _, k, v = make(seq_lens, seq_lens, hq, hk, d, dtype, seed + 1)
    blocks = [-(-n // BLOCK_SIZE) for n in seq_lens]
    num_blocks = sum(blocks) + spare_blocks
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    table = torch.full((len(seq_lens), max(blocks) + 2), -1, dtype=torch.int32)
    k_cache = torch.full((num_blocks, BLOCK_SIZE, hk, d), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    start = 0
    for b, n in enumerate(seq_lens):
        table[b, :blocks[b]] = torch.tensor(perm[:blocks[b]], dtype=torch.int32)
        perm = perm[blocks[b]:]
        for p in range(n):
            block, offset = int(table[b, p // BLOCK_SIZE]), p % BLOCK_SIZE
            k_cache[block, offset] = k[start + p]
            v_cache[block, offset] = v[start + p]
        start += n
    return q, k, v, k_cache, v_cache, table


def cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def run(impl, q, k_cache, v_cache, table, q_lens, seq_lens, **kwargs):
    with lepton_kernels.use(paged_attention=impl):
        return lepton_kernels.paged_attention(
            q, k_cache, v_cache, table, torch.tensor(seq_lens, dtype=torch.int32, device=q.device),
            cu(q_lens).to(q.device), max(q_lens), max(seq_lens), **kwargs)


# What the Triton interpreter runs by default; the whole grid runs under `pytest -m slow`.
TRITON_FAST = {
    torch.float32: {"decode-8:2-d80", "decode-7:1-d64-w8", "chunked_prefill-2:2-d80-w8",
                    "prefix_prefill-7:1-d80", "mixed-8:2-d64", "mixed-2:2-d80-w8"},
    torch.float16: {"decode-7:1-d80", "chunked_prefill-8:2-d64", "mixed-2:2-d64-w8"},
}


def grid(dtype):
    for case in CASES:
        for hq, hk in HEADS:
            for d in (80, 64):
                for window in (None, 8):
                    name = f"{case}-{hq}:{hk}-d{d}{'' if window is None else f'-w{window}'}"
                    for impl in IMPLS:
                        fast = impl == "eager" and dtype == torch.float32 or name in TRITON_FAST[dtype]
                        yield pytest.param(impl, case, hq, hk, d, window, id=f"{impl}-{name}",
                                           marks=() if fast else pytest.mark.slow)


@pytest.mark.parametrize("impl,case,hq,hk,d,window", list(grid(torch.float32)))
def test_matches_contiguous_attention_fp32(impl, case, hq, hk, d, window):
    q_lens, seq_lens = CASES[case]
    q, k, v, k_cache, v_cache, table = paged_inputs(q_lens, seq_lens, hq, hk, d, torch.float32)
    out = run(impl, q, k_cache, v_cache, table, q_lens, seq_lens, sliding_window=window)
    check(out, q, k, v, q_lens, seq_lens, True, sliding_window=window)


@pytest.mark.parametrize("impl,case,hq,hk,d,window", list(grid(torch.float16)))
def test_matches_contiguous_attention_fp16(impl, case, hq, hk, d, window):
    q_lens, seq_lens = CASES[case]
    q, k, v, k_cache, v_cache, table = paged_inputs(q_lens, seq_lens, hq, hk, d, torch.float16, seed=3)
    out = run(impl, q, k_cache, v_cache, table, q_lens, seq_lens, sliding_window=window)
    check(out, q, k, v, q_lens, seq_lens, True, sliding_window=window)


@pytest.mark.parametrize("case,hq,hk,d,window,splits,dtype", [
    ("decode", 8, 2, 80, None, 3, "float32"), ("decode", 4, 1, 64, None, 2, "float16"),
    ("mixed", 7, 1, 64, 8, 3, "float16"), ("prefix_prefill", 4, 4, 80, 20, 2, "float32")])
def test_triton_split_kv_matches(monkeypatch, case, hq, hk, d, window, splits, dtype):
    """Flash-decoding: the key range of every program split in `splits` parts and merged."""
    from lepton_kernels.triton_kernels import paged_attention as kernel
    monkeypatch.setattr(kernel, "_num_splits", lambda *args: splits)
    q_lens, seq_lens = CASES[case]
    q, k, v, k_cache, v_cache, table = paged_inputs(q_lens, seq_lens, hq, hk, d, getattr(torch, dtype),
                                                    seed=5)
    out = run("triton", q, k_cache, v_cache, table, q_lens, seq_lens, sliding_window=window)
    check(out, q, k, v, q_lens, seq_lens, True, sliding_window=window)


def test_triton_splits_few_long_sequences_by_itself():
    from lepton_kernels.triton_kernels import paged_attention as kernel
    cpu = torch.device("cpu")
    assert kernel._num_splits(1, 64, cpu) > 1     # one sequence, one kv head: split the keys
    assert kernel._num_splits(64, 4096, cpu) == 1  # the grid already fills the machine
    q_lens, seq_lens = [1], [45]
    q, k, v, k_cache, v_cache, table = paged_inputs(q_lens, seq_lens, 4, 1, 64, torch.float32)
    out = run("triton", q, k_cache, v_cache, table, q_lens, seq_lens)
    check(out, q, k, v, q_lens, seq_lens, True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("window", [1, 2, 16, 17])
def test_sliding_window_edges(impl, window):
    # Windows that start exactly on, just before and just after a 16-key tile boundary.
    q_lens, seq_lens = [20, 1, 3], [37, 34, 33]
    q, k, v, k_cache, v_cache, table = paged_inputs(q_lens, seq_lens, 4, 2, 64, torch.float32, seed=6)
    out = run(impl, q, k_cache, v_cache, table, q_lens, seq_lens, sliding_window=window)
    check(out, q, k, v, q_lens, seq_lens, True, sliding_window=window)


def test_unsupported_head_dim_falls_back_to_eager():
    q, k, v, k_cache, v_cache, table = paged_inputs([1, 2], [5, 19], 2, 1, 59, torch.float32)
    args = (q, k_cache, v_cache, table, torch.tensor([5, 19], dtype=torch.int32), cu([1, 2]), 2, 19)
    assert lepton_kernels.paged_attention.select(*args) == "eager"
    with lepton_kernels.use(paged_attention="triton"), pytest.raises(
            lepton_kernels.KernelUnavailableError, match="head_dim 59"):
        lepton_kernels.paged_attention(*args)
    check(lepton_kernels.paged_attention(*args), q, k, v, [1, 2], [5, 19], True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs a GPU (interpreter gap)")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case,hq,hk,d,window", [
    ("decode", 8, 2, 128, None), ("mixed", 7, 1, 80, 8), ("prefix_prefill", 4, 4, 64, None)])
def test_matches_contiguous_attention_bf16_cuda(impl, case, hq, hk, d, window):
    q_lens, seq_lens = CASES[case]
    q, k, v, k_cache, v_cache, table = paged_inputs(q_lens, seq_lens, hq, hk, d, torch.bfloat16)
    out = run(impl, q.cuda(), k_cache.cuda(), v_cache.cuda(), table.cuda(), q_lens, seq_lens,
              sliding_window=window)
    check(out.cpu(), q, k, v, q_lens, seq_lens, True, sliding_window=window)


@pytest.mark.parametrize("impl", IMPLS)
def test_scale_and_sequence_without_new_tokens(impl):
    q_lens, seq_lens = [2, 0, 1], [18, 5, 3]
    q, k, v, k_cache, v_cache, table = paged_inputs(q_lens, seq_lens, 4, 2, 64, torch.float32)
    out = run(impl, q, k_cache, v_cache, table, q_lens, seq_lens, scale=0.2)
    check(out, q, k, v, q_lens, seq_lens, True, scale=0.2)


@pytest.mark.parametrize("impl", IMPLS)
def test_cache_is_not_modified(impl):
    q, _, _, k_cache, v_cache, table = paged_inputs([1, 3], [9, 20], 4, 2, 64, torch.float32)
    before = [t.clone() for t in (q, k_cache, v_cache, table)]
    run(impl, q, k_cache, v_cache, table, [1, 3], [9, 20])
    for old, new in zip(before, (q, k_cache, v_cache, table)):
        assert torch.equal(old.nan_to_num(), new.nan_to_num()) and torch.equal(old.isnan(), new.isnan())


def _bad_calls():
    q, _, _, k_cache, v_cache, table = paged_inputs([1, 3], [9, 20], 4, 2, 64, torch.float32)
    seq_lens, cq = torch.tensor([9, 20], dtype=torch.int32), cu([1, 3])
    good = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=table, seq_lens=seq_lens,
                cu_seqlens_q=cq, max_seqlen_q=3, max_seqlen_k=20)
    yield "q", dict(good, q=q[None])
    yield "k_cache", dict(good, k_cache=k_cache[0])
    yield "dtype", dict(good, v_cache=v_cache.half())
    yield "v_cache shape", dict(good, v_cache=v_cache[:, :8])
    yield "head_dim", dict(good, k_cache=k_cache[..., :32], v_cache=v_cache[..., :32])
    yield "multiple of k_cache heads", dict(good, q=q[:, :3])
    yield "block_tables", dict(good, block_tables=table.long())
    yield "block_tables.shape", dict(good, block_tables=table[:1])
    yield "seq_lens", dict(good, seq_lens=seq_lens.long())
    yield "cu_seqlens_q.shape", dict(good, cu_seqlens_q=cq[:2])
    yield "cu_seqlens_q", dict(good, cu_seqlens_q=torch.tensor([0, 1, 5], dtype=torch.int32))
    yield r"seq_lens\[1\]", dict(good, seq_lens=torch.tensor([9, 2], dtype=torch.int32))
    yield r"seq_lens\[1\]", dict(good, seq_lens=torch.tensor([9, 20 + 16 * 3], dtype=torch.int32),
                                 max_seqlen_k=100)
    yield r"seq_lens\[1\]", dict(good, max_seqlen_k=19)
    bad_table = table.clone()
    bad_table[1, 1] = k_cache.shape[0]
    yield r"block_tables\[1, 1\]", dict(good, block_tables=bad_table)
    yield "sliding_window", dict(good, sliding_window=-3)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("match,kwargs", list(_bad_calls()), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_inputs_raise_value_error(impl, match, kwargs):
    with lepton_kernels.use(paged_attention=impl), pytest.raises(ValueError, match=match):
        lepton_kernels.paged_attention(**kwargs)
