"""copy_blocks against a loop over layers, block pairs and slots."""

import re

import pytest
import torch

import lepton_kernels


def usable_impls(op_name):
    """eager and, when the native extension is built, ext: both must match the loop."""
    op = lepton_kernels.get_op(op_name)
    return [name for name in op.impl_names()
            if name == "eager" or op.get_impl(name).why_not("cpu", torch.float32, explicit=True) is None]


IMPLS = usable_impls("copy_blocks")


def copy_blocks(impl, *args):
    with lepton_kernels.use(copy_blocks=impl):
        return lepton_kernels.copy_blocks(*args)


def make_caches(layers, blocks, dtype=torch.float32, block_size=16, heads=2, dim=80):
    g = torch.Generator().manual_seed(layers * 100 + blocks)
    shape = (blocks, block_size, heads, dim)
    k_caches = [torch.randn(shape, generator=g).to(dtype) for _ in range(layers)]
    v_caches = [torch.randn(shape, generator=g).to(dtype) for _ in range(layers)]
    return k_caches, v_caches


def reference(caches, pairs):
    """Each layer's cache after copying block src to dst slot by slot, for every (src, dst)."""
    out = []
    for cache in caches:
        ref = cache.clone()
        for src, dst in pairs:
            for offset in range(cache.shape[1]):
                ref[dst, offset] = cache[src, offset]
        out.append(ref)
    return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layers,blocks,pairs", [
    (1, 2, [[0, 1]]),
    (3, 9, [[2, 7], [2, 0], [5, 8], [1, 3]]),     # one source copied to two destinations
    (2, 5, [[4, 1]]),
    (2, 4, []),                                    # nothing to copy
])
def test_matches_loop(impl, dtype, layers, blocks, pairs):
    k_caches, v_caches = make_caches(layers, blocks, dtype)
    k_ref, v_ref = reference(k_caches, pairs), reference(v_caches, pairs)
    mapping = torch.tensor(pairs, dtype=torch.int64).view(-1, 2)
    assert copy_blocks(impl, k_caches, v_caches, mapping) is None
    for got, want in zip(k_caches + v_caches, k_ref + v_ref):
        assert torch.equal(got, want)


@pytest.mark.parametrize("impl", IMPLS)
def test_tuples_of_caches_are_accepted(impl):
    k_caches, v_caches = make_caches(2, 3)
    k_ref = reference(k_caches, [[0, 2]])
    copy_blocks(impl, tuple(k_caches), tuple(v_caches), torch.tensor([[0, 2]]))
    assert all(torch.equal(a, b) for a, b in zip(k_caches, k_ref))


@pytest.mark.parametrize("impl", IMPLS)
def test_the_mapping_is_not_modified(impl):
    k_caches, v_caches = make_caches(1, 4)
    mapping = torch.tensor([[0, 3], [1, 2]])
    copy_blocks(impl, k_caches, v_caches, mapping)
    assert torch.equal(mapping, torch.tensor([[0, 3], [1, 2]]))


def _bad(k_caches, v_caches, mapping):
    yield "k_caches", (k_caches[0], v_caches, mapping)
    yield "v_caches", (k_caches, v_caches[:1], mapping)
    yield "v_caches[1]", (k_caches, [v_caches[0], v_caches[1][:3]], mapping)
    yield "k_caches[0]", ([k_caches[0][0]] + k_caches[1:], v_caches, mapping)
    yield "v_caches[0]", (k_caches, [v_caches[0].half(), v_caches[1]], mapping)
    yield "block_mapping", (k_caches, v_caches, mapping.to(torch.int32))
    yield "block_mapping", (k_caches, v_caches, mapping[:, 0])
    yield "block_mapping", (k_caches, v_caches, torch.tensor([[0, 1, 2]]))
    yield "block_mapping", (k_caches, v_caches, torch.tensor([[0, 4]]))        # dst out of range
    yield "block_mapping", (k_caches, v_caches, torch.tensor([[-1, 2]]))       # negative src
    yield "block_mapping", (k_caches, v_caches, torch.tensor([[0, 2], [1, 2]]))  # dst twice
    yield "block_mapping", (k_caches, v_caches, torch.tensor([[0, 2], [2, 3]]))  # dst is a src
    yield "block_mapping", (k_caches, v_caches, [[0, 2]])


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_inputs_raise_value_error_naming_the_argument(impl):
    k_caches, v_caches = make_caches(2, 4)
    mapping = torch.tensor([[0, 2]])
    before = [c.clone() for c in k_caches + v_caches]
    for name, bad in _bad(k_caches, v_caches, mapping):
        with pytest.raises(ValueError, match=rf"(^|\W){re.escape(name)}\W"):
            copy_blocks(impl, *bad)
    # A rejected call copies nothing, not even in the layers checked before the bad one.
    assert all(torch.equal(a, b) for a, b in zip(k_caches + v_caches, before))
