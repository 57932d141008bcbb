"""The cpu quant_matmul on the formats checkpoints bring (GPTQ / AWQ, repacked at load; quantize
never makes them): int8 in groups with zero points, int8 per channel with zero points, int4 with
one group per row (group_size == K), and an act-order input permutation. Each against float64
math on the raw fields, written here from the format's definition:

    W'[n, k] = (q[n, k] - z[n, k // g]) * s[n, k // g],    y[m, n] = sum_k x[m, perm[k]] W'[n, k]
"""

import pytest
import torch

from lepton_kernels import registry
from lepton_kernels.cpu_kernels import quant_matmul as cpu
from lepton_kernels.ops.quantize import QuantizedWeight, pack_int4
from tests.kernels.test_quant_matmul import run

pytestmark = pytest.mark.skipif(cpu.available() is not None, reason=f"cpu kernels: {cpu.available()}")

# every path of the kernel: decode tiles, batched dot tiles, outer-product tiles, dequantize + sgemm
ROWS = [1, 5, 7, 16, 33, 70, cpu.DEQUANT_ROWS + 1]


def make_weight(bits, n, k, group, zeros, perm, seed):
    """A QuantizedWeight with random fields, and its float64 W' (columns in stored order)."""
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group is None else k // group
    scales = torch.rand(n, groups, generator=g) * 0.02 + 0.001
    if bits == 8:
        q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        z = torch.randint(-128, 128, (n, groups), generator=g, dtype=torch.int8) if zeros else None
        qweight, q_int = q, q.to(torch.int64)
    else:
        q_int = torch.randint(0, 16, (n, k), generator=g)
        z = torch.randint(0, 16, (n, groups), generator=g).to(torch.uint8)
        qweight = pack_int4(q_int)
    z_int = torch.zeros(n, groups, dtype=torch.int64) if z is None else z.to(torch.int64)
    col_group = torch.arange(k) // (k if group is None else group)
    w = (q_int[:, :].double() - z_int[:, col_group].double()) * scales.double()[:, col_group]
    p = torch.randperm(k, generator=g) if perm else None
    if group is None:   # per channel: scales (and zeros) are [N]
        scales, z = scales[:, 0].contiguous(), None if z is None else z[:, 0].contiguous()
    qw = QuantizedWeight(qweight, scales, z, bits, group, (n, k), torch.float32, perm=p)
    return qw, w


def reference(x, qw, w):
    xs = x.double() if qw.perm is None else x.double()[:, qw.perm]
    return xs @ w.T


CASES = {
    "int8_g32_zeros": (8, 37, 96, 32, True, False),
    "int8_g128_zeros": (8, 29, 256, 128, True, False),
    "int8_g64_symmetric": (8, 37, 192, 64, False, False),
    "int8_perchannel_zeros": (8, 37, 97, None, True, False),    # odd K: the scalar tails
    "int8_groupK_zeros": (8, 21, 160, 160, True, False),
    "int4_groupK": (4, 37, 160, 160, True, False),
    "int4_g32_perm": (4, 29, 128, 32, True, True),
    "int8_g32_perm": (8, 29, 128, 32, True, True),
    "int8_perchannel_perm": (8, 29, 96, None, False, True),
}


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_formats_match_float64(case, m):
    bits, n, k, group, zeros, perm = CASES[case]
    qw, w = make_weight(bits, n, k, group, zeros, perm, seed=n * k + m)
    assert cpu.supports(torch.zeros(1, k), qw) is True
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(5))
    y = run("cpu", x, qw, bias)
    ref = reference(x, qw, w) + bias.double()
    # float32 sums of K products: |error| <= ~K * 2^-24 * sum|x w| (rounded up to 2^-20 here).
    bound = 2.0**-20 * k * ((x.double().abs() @ w.abs().T) + 1)
    assert y.shape == (m, n) and ((y.double() - ref).abs() <= bound).all()


def test_the_cpu_kernel_is_chosen_for_checkpoint_formats():
    qw, _ = make_weight(8, 16, 64, 32, True, True, seed=1)
    assert registry.get_op("quant_matmul").select(torch.zeros(2, 64), qw) == "cpu"


def test_int4_groups_that_split_a_block_are_left_to_eager():
    """The kernel reads int4 in blocks of 32 inputs; a group of 16 would split one."""
    qw, _ = make_weight(4, 8, 64, 32, True, False, seed=2)
    odd = QuantizedWeight(qw.qweight, qw.scales.repeat_interleave(2, 1), qw.zeros.repeat_interleave(2, 1),
                          4, 16, qw.shape, qw.dtype)
    assert "32" in cpu.supports(torch.zeros(1, 64), odd)
