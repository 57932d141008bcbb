"""paged_attention (eager spec and Triton kernels) against a float64 reference written here that
reads the paged cache position by position through the block table, with flash-attention's
tolerance rule (error at most twice torch SDPA's own error in the same dtype, SDPA run per
sequence on the same K/V laid out contiguously), and Triton against the eager spec.

The test writes the cache itself with plain indexing: shuffled (non-contiguous) block tables,
block sizes 16, 32 and 64 with partly filled last blocks, table entries past the last block
padded with -1, and every slot no sequence owns filled with NaN, so reading one shows up."""

import math

import pytest
import torch

import lepton_kernels
from lepton_kernels.triton_kernels import paged_attention as launcher

from .test_flash_attention import (  # noqa: F401 (autouse fixtures)
    FLOOR, make, poison_new_tensors, sdpa, single_thread)

IMPLS = ["eager", "triton"]

# name -> (q lens, seq lens): the new tokens of sequence b are its last q_len positions
CASES = {
    "decode": ([1, 1, 1, 1], [1, 16, 33, 70]),
    "chunked_prefill": ([16, 17], [16, 45]),
    "prefix_prefill": ([5, 37], [21, 37]),
    # an empty sequence, one with cached tokens but no new ones, a one-token sequence
    "mixed": ([1, 17, 0, 1, 4, 0], [37, 17, 0, 1, 20, 5]),
}


def paged_inputs(q_lens, seq_lens, hq, hk, d, dtype, block_size=16, seed=0, spare_blocks=3):
    """(q, k, v, k_cache, v_cache, table): k/v hold every sequence's context contiguously, the
    caches the same K/V scattered through a shuffled block table into NaN-filled blocks."""
    q, _, _ = make(q_lens, seq_lens, hq, hk, d, dtype, seed)
    _, k, v = make(seq_lens, seq_lens, hq, hk, d, dtype, seed + 1)
    blocks = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks) + spare_blocks
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    table = torch.full((len(seq_lens), max(blocks) + 2), -1, dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, hk, d), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    start = 0
    for b, n in enumerate(seq_lens):
        table[b, :blocks[b]] = torch.tensor(perm[:blocks[b]], dtype=torch.int32)
        perm = perm[blocks[b]:]
        for p in range(n):
            block, offset = int(table[b, p // block_size]), p % block_size
            k_cache[block, offset] = k[start + p]
            v_cache[block, offset] = v[start + p]
        start += n
    return q, k, v, k_cache, v_cache, table


def paged_reference(q, k_cache, v_cache, table, q_lens, seq_lens, scale=None, window=None):
    """float64 attention read straight from the paged cache: query i of sequence b sits at
    position p = seq_len - q_len + i and attends to positions max(0, p - W + 1) .. p, each fetched
    from block table[b, pos // BS], offset pos % BS; softmax by hand."""
    block_size, hk = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // hk
    scale = 1 / math.sqrt(q.shape[2]) if scale is None else scale
    out = torch.zeros(q.shape, dtype=torch.float64)
    t = 0
    for b, (lq, lk) in enumerate(zip(q_lens, seq_lens)):
        blocks = [int(table[b, p // block_size]) for p in range(lk)]
        keys = [k_cache[blocks[p], p % block_size].double().repeat_interleave(group, 0) for p in range(lk)]
        values = [v_cache[blocks[p], p % block_size].double().repeat_interleave(group, 0) for p in range(lk)]
        for i in range(lq):
            p = lk - lq + i
            lo = 0 if window is None else max(0, p - window + 1)
            kk, vv = torch.stack(keys[lo:p + 1]), torch.stack(values[lo:p + 1])   # [L, Hq, D]
            s = torch.einsum("hd,lhd->hl", q[t + i].double(), kk) * scale
            e = torch.exp(s - s.max(dim=1, keepdim=True).values)
            out[t + i] = torch.einsum("hl,lhd->hd", e / e.sum(dim=1, keepdim=True), vv)
        t += lq
    return out


def cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def run(impl, q, k_cache, v_cache, table, q_lens, seq_lens, **kwargs):
    with lepton_kernels.use(paged_attention=impl):
        return lepton_kernels.paged_attention(
            q, k_cache, v_cache, table, torch.tensor(seq_lens, dtype=torch.int32, device=q.device),
            cu(q_lens).to(q.device), max(q_lens), max(seq_lens), **kwargs)


def check(out, inputs, q_lens, seq_lens, scale=None, window=None):
    """Error against the float64 paged reference at most 2x torch SDPA's in the same dtype."""
    q, k, v, k_cache, v_cache, table = inputs
    assert out.dtype == q.dtype and out.shape == q.shape
    assert not out.isnan().any(), "unwritten or NaN output rows"
    ref = paged_reference(q, k_cache, v_cache, table, q_lens, seq_lens, scale, window)
    torch_err = (sdpa(q, k, v, q_lens, seq_lens, True, scale, window).double() - ref).abs().max().item()
    err = (out.cpu().double() - ref).abs().max().item()
    assert err <= 2 * torch_err + FLOOR[q.dtype], f"max error {err:.3g}, torch's {torch_err:.3g}"
    return torch_err


def compare(case, hq, hk, d, block_size, window, dtype, seed=0, **kwargs):
    """Eager and Triton both against the reference, and Triton against eager."""
    q_lens, seq_lens = CASES[case] if isinstance(case, str) else case
    inputs = paged_inputs(q_lens, seq_lens, hq, hk, d, dtype, block_size, seed)
    q, _, _, k_cache, v_cache, table = inputs
    outs = {impl: run(impl, q, k_cache, v_cache, table, q_lens, seq_lens, sliding_window=window,
                      **kwargs) for impl in IMPLS}
    for impl in IMPLS:
        torch_err = check(outs[impl], inputs, q_lens, seq_lens, kwargs.get("scale"), window)
    torch.testing.assert_close(outs["triton"].double(), outs["eager"].double(), rtol=0,
                               atol=4 * torch_err + 2 * FLOOR[dtype])


# (case, Hq, Hk, head_dim, block_size, sliding_window): GQA 1-8, odd head counts, head dims
# 64/80/96/128/256, block sizes 16/32 (and 64: blocks larger than the interpreter's 32-key tile).
SHAPES_FP32 = [
    ("decode", 8, 2, 80, 16, None), ("decode", 3, 3, 96, 32, None), ("decode", 8, 1, 64, 32, 16),
    ("decode", 5, 1, 128, 16, 33), ("decode", 6, 3, 256, 32, None),
    ("chunked_prefill", 6, 2, 96, 16, None), ("chunked_prefill", 7, 1, 80, 32, 8),
    ("prefix_prefill", 12, 2, 64, 16, None), ("prefix_prefill", 4, 4, 80, 32, 20),
    ("mixed", 8, 2, 64, 16, 8), ("mixed", 7, 1, 96, 32, None), ("mixed", 2, 2, 80, 16, 32),
    ("mixed", 4, 1, 256, 16, None), ("mixed", 4, 1, 64, 64, None), ("decode", 4, 2, 128, 64, 40),
]
SHAPES_FP16 = [
    ("decode", 7, 1, 80, 16, None), ("decode", 8, 4, 96, 32, 32), ("chunked_prefill", 8, 2, 64, 32, None),
    ("prefix_prefill", 3, 1, 128, 16, 16), ("mixed", 2, 2, 64, 16, 8), ("mixed", 6, 2, 80, 32, None),
]


def _id(shape):
    case, hq, hk, d, bs, window = shape
    return f"{case}-{hq}:{hk}-d{d}-bs{bs}{'' if window is None else f'-w{window}'}"


@pytest.mark.parametrize("shape", SHAPES_FP32, ids=_id)
def test_matches_reference_fp32(shape):
    compare(*shape, torch.float32)


@pytest.mark.parametrize("shape", SHAPES_FP16, ids=_id)
def test_matches_reference_fp16(shape):
    compare(*shape, torch.float16, seed=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs a GPU (interpreter gap)")
@pytest.mark.parametrize("shape", [("decode", 8, 2, 128, 16, None), ("mixed", 7, 1, 80, 32, 8),
                                   ("prefix_prefill", 4, 4, 256, 16, None)], ids=_id)
def test_matches_reference_bf16_cuda(shape):
    case, hq, hk, d, block_size, window = shape
    q_lens, seq_lens = CASES[case]
    inputs = paged_inputs(q_lens, seq_lens, hq, hk, d, torch.bfloat16, block_size)
    q, _, _, k_cache, v_cache, table = inputs
    for impl in IMPLS:
        out = run(impl, q.cuda(), k_cache.cuda(), v_cache.cuda(), table.cuda(), q_lens, seq_lens,
                  sliding_window=window)
        check(out.cpu(), inputs, q_lens, seq_lens, window=window)


class _Recorder:
    """Stands in for a kernel in the launcher module: records (name, grid, constexprs), then
    launches the real kernel."""

    def __init__(self, name, kernel, seen):
        self.name, self.kernel, self.seen = name, kernel, seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append((self.name, tuple(grid), kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def launches(monkeypatch):
    seen = []
    for name in ("_paged_decode_kernel", "_paged_prefill_kernel", "_merge_splits_kernel"):
        monkeypatch.setattr(launcher, name, _Recorder(name, getattr(launcher, name), seen))
    return seen


@pytest.mark.parametrize("case,hq,hk,d,window,splits,dtype", [
    ("decode", 8, 2, 80, None, 3, torch.float32), ("decode", 4, 1, 64, None, 2, torch.float16),
    ("mixed", 7, 1, 64, 8, 3, torch.float16), ("prefix_prefill", 4, 4, 80, 20, 2, torch.float32),
    ("mixed", 6, 2, 96, None, 4, torch.float32)])
def test_split_kv_matches(monkeypatch, launches, case, hq, hk, d, window, splits, dtype):
    """Flash-decoding forced: the key range of every program cut in `splits` parts and merged
    by one kernel, in decode and prefill programs alike."""
    monkeypatch.setattr(launcher, "_num_splits", lambda *args: splits)
    compare(case, hq, hk, d, 16, window, dtype, seed=5)
    names = [name for name, _, _ in launches]
    assert names.count("_merge_splits_kernel") == 1   # the eager run launches nothing
    assert all(kw["NUM_SPLITS"] == splits for name, _, kw in launches if name != "_merge_splits_kernel")


@pytest.mark.parametrize("q_lens,seq_lens,block_size", [([1], [150], 16), ([3], [200], 32)])
def test_long_context_splits_by_itself(launches, q_lens, seq_lens, block_size):
    """One sequence, one kv head: the grid leaves the (pretend, 4) SMs idle, so the keys split."""
    cpu = torch.device("cpu")
    assert launcher._num_splits(64, 4096, cpu) == 1     # the grid already fills the machine
    compare((q_lens, seq_lens), 4, 1, 64, block_size, None, torch.float32)
    split = [kw["NUM_SPLITS"] for name, _, kw in launches if name == "_paged_decode_kernel"]
    assert split and split[0] > 1
    assert any(name == "_merge_splits_kernel" for name, _, _ in launches)


def test_decode_rows_get_decode_tiles(launches):
    """A mixed batch: the q_len 1 sequences run in GQA-packed programs (16 rows = the 4 query
    heads of a kv head, padded), the others in query tiles; a pure decode step launches no
    prefill kernel; the tile is whole cache blocks."""
    compare("mixed", 8, 2, 64, 16, None, torch.float32)
    kernels = {name: (grid, kw) for name, grid, kw in launches}
    grid, kw = kernels["_paged_decode_kernel"]
    assert grid == (6, 2, 1) and kw["BLOCK_M"] == 16 and kw["GROUP"] == 4
    assert kw["BLOCK_N"] == kw["TILE_BLOCKS"] * kw["BLOCK_SIZE"] == 32
    grid, kw = kernels["_paged_prefill_kernel"]
    assert kw["BLOCK_M"] == 32 and grid == (3, 6, 2)      # 17 tokens x 4 heads = 68 rows
    launches.clear()
    compare("decode", 8, 2, 64, 32, None, torch.float32)
    assert [name for name, _, _ in launches] == ["_paged_decode_kernel"]
    assert launches[0][2]["TILE_BLOCKS"] == 1


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_real_config_table_runs(monkeypatch, launches, arch, dtype):
    """The sm_80 / sm_90 table entries (64-key tiles of four 16-token blocks, 128-row query
    tiles) computed by the interpreter: the launcher asked as if on that GPU."""
    monkeypatch.setattr(launcher, "_arch", lambda device: arch)
    q_lens, seq_lens = [1, 40, 1], [90, 130, 7]
    compare((q_lens, seq_lens), 8, 2, 128 if dtype == torch.float16 else 64, 16, None, dtype)
    kw = {name: kw for name, _, kw in launches}
    assert kw["_paged_prefill_kernel"]["BLOCK_M"] == (128 if dtype == torch.float16 else 64)
    assert kw["_paged_decode_kernel"]["TILE_BLOCKS"] == kw["_paged_decode_kernel"]["BLOCK_N"] // 16 > 1


def test_config_table_covers_production_shapes():
    from lepton_kernels.triton_kernels.paged_attention_configs import decode_tiles, prefill_tiles
    for arch in (80, 86, 89, 90):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for d in (64, 80, 96, 128, 256):
                block_d = 1 << (d - 1).bit_length()
                for group in range(1, 9):
                    dec = decode_tiles(arch, dtype, block_d, group)
                    assert dec.block_m == 16 and dec.block_n >= 16
                    for q_len in (2, 7, 64, 1000):
                        pre = prefill_tiles(arch, dtype, block_d, q_len * group)
                        assert 16 <= pre.block_m <= 128 and pre.num_warps in (4, 8)
                        # K + V tiles of every pipeline stage fit an A100's shared memory
                        assert 2 * pre.num_stages * pre.block_n * block_d * dtype.itemsize <= 160 << 10


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("window", [1, 31, 32, 33])
def test_sliding_window_on_tile_boundaries(block_size, window):
    # The interpreter's key tile is 32 keys: windows that start exactly on, just before and just
    # after a tile boundary (seq_len - window = 32 or 64 for the decode sequences).
    compare(([20, 1, 1, 3], [64, 65, 64, 33]), 4, 2, 64, block_size, window, torch.float32, seed=6)


def test_unsupported_shapes_fall_back_to_eager():
    for d, block_size, reason in [(59, 16, "head_dim 59"), (64, 24, "block_size 24")]:
        inputs = paged_inputs([1, 2], [5, 19], 2, 1, d, torch.float32, block_size)
        q, _, _, k_cache, v_cache, table = inputs
        args = (q, k_cache, v_cache, table, torch.tensor([5, 19], dtype=torch.int32), cu([1, 2]), 2, 19)
        # automatic selection on CPU: the C kernel or eager, never the refused triton
        assert lepton_kernels.paged_attention.select(*args) in ("cpu", "eager")
        with lepton_kernels.use(paged_attention="triton"), pytest.raises(
                lepton_kernels.KernelUnavailableError, match=reason):
            lepton_kernels.paged_attention(*args)
        check(lepton_kernels.paged_attention(*args), inputs, [1, 2], [5, 19])


@pytest.mark.parametrize("impl", IMPLS)
def test_scale_and_empty_batches(impl):
    inputs = paged_inputs([2, 0, 1], [18, 5, 3], 4, 2, 64, torch.float32)
    q, _, _, k_cache, v_cache, table = inputs
    check(run(impl, q, k_cache, v_cache, table, [2, 0, 1], [18, 5, 3], scale=0.2), inputs,
          [2, 0, 1], [18, 5, 3], scale=0.2)
    # no new tokens at all (a step in which every sequence only has cached tokens)
    out = run(impl, q[:0], k_cache, v_cache, table, [0, 0, 0], [18, 5, 0])
    assert out.shape == (0, 4, 64)


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
