"""Registry: selection, caching, the three override layers and the error messages."""

import os
import threading

import pytest
import torch

import lepton_kernels
from lepton_kernels import registry


@pytest.fixture
def toy():
    """A throwaway op 'toy_scale' (x * 2) with a fake cpu 'fast' impl and a cuda-only 'gpu' impl."""
    calls = []

    def eager(x):
        calls.append("eager")
        return x * 2

    def fast(x):
        calls.append("fast")
        return x + x

    op = registry.register_op("toy_scale", eager)
    registry.register_impl("toy_scale", "gpu", lambda x: x * 2, device_types=["cuda"])
    registry.register_impl("toy_scale", "fast", fast, device_types=["cpu"], dtypes=[torch.float32],
                           supports=lambda x: True if x.shape[-1] % 2 == 0 else "odd last dim")
    yield op, calls
    del registry._OPS["toy_scale"]


def test_every_op_of_the_design_is_registered():
    expected = {"rms_norm", "layer_norm", "rotary_embedding", "silu_and_mul", "gelu_and_mul",
                "flash_attention", "paged_attention", "reshape_and_cache", "copy_blocks",
                "quantize", "dequantize", "quant_matmul"}
    assert expected <= set(lepton_kernels.list_ops())
    for name in expected:
        assert getattr(lepton_kernels, name) is registry.get_op(name)
        assert registry.get_op(name).sample_inputs is not None, name


def test_auto_selection_takes_first_usable_impl(toy):
    op, calls = toy
    assert torch.equal(op(torch.ones(2, 4)), torch.full((2, 4), 2.0))
    assert calls == ["fast"]
    assert op.select(torch.ones(4)) == "fast"


def test_auto_selection_falls_back_on_dtype_and_supports(toy):
    op, calls = toy
    op(torch.ones(4, dtype=torch.float64))  # dtype not declared by 'fast'
    op(torch.ones(3))  # supports() refuses odd sizes
    assert calls == ["eager", "eager"]


def test_choice_is_cached_per_device_and_dtype(toy):
    op, _ = toy
    op(torch.ones(4))
    op(torch.ones(4, dtype=torch.float16))
    assert set(op._auto) == {("cpu", torch.float32), ("cpu", torch.float16)}
    assert [i.name for i in op._auto[("cpu", torch.float32)]] == ["fast"]
    assert op._auto[("cpu", torch.float16)] == []


def test_use_overrides_and_nests(toy):
    op, calls = toy
    x = torch.ones(4)
    with lepton_kernels.use(toy_scale="eager"):
        op(x)
        with lepton_kernels.use(toy_scale="fast"):
            op(x)
        op(x)
    op(x)
    assert calls == ["eager", "fast", "eager", "fast"]


def test_use_is_local_to_a_thread(toy):
    op, _ = toy
    seen = {}
    with lepton_kernels.use(toy_scale="eager"):
        worker = threading.Thread(target=lambda: seen.update(other=op.select(torch.ones(4))))
        worker.start()
        worker.join()
        seen["here"] = op.select(torch.ones(4))
    assert seen == {"other": "fast", "here": "eager"}


def test_env_override(toy, monkeypatch):
    op, calls = toy
    monkeypatch.setenv("LEPTON_KERNELS", "toy_scale=eager")
    op(torch.ones(4))
    monkeypatch.setenv("LEPTON_KERNELS", " toy_scale = fast ")
    op(torch.ones(4))
    assert calls == ["eager", "fast"]


def test_layers_priority_use_over_engine_over_env(toy, monkeypatch):
    op, _ = toy
    x = torch.ones(4)
    monkeypatch.setenv("LEPTON_KERNELS", "toy_scale=eager")
    with registry.engine_kernels({"toy_scale": "fast"}):
        assert op.select(x) == "fast"
        with lepton_kernels.use(toy_scale="eager"):
            assert op.select(x) == "eager"
    assert op.select(x) == "eager"


def test_wildcard_applies_only_to_ops_that_have_the_impl(toy):
    op, _ = toy
    with lepton_kernels.use("fast"):
        assert op.select(torch.ones(4)) == "fast"
        assert lepton_kernels.rms_norm.select(torch.ones(2, 4), torch.ones(4)) == "eager"


def test_explicit_unavailable_impl_raises_with_reason(toy):
    op, _ = toy
    with lepton_kernels.use(toy_scale="gpu"):
        with pytest.raises(lepton_kernels.KernelUnavailableError, match=r"toy_scale.*'gpu'.*cuda"):
            op(torch.ones(4))
    with lepton_kernels.use(toy_scale="fast"):
        with pytest.raises(lepton_kernels.KernelUnavailableError, match="odd last dim"):
            op(torch.ones(3))
        with pytest.raises(lepton_kernels.KernelUnavailableError, match="dtype float64"):
            op(torch.ones(4, dtype=torch.float64))


def test_unknown_names_raise_and_list_valid_ones(toy, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown op 'nope'.*rms_norm"):
        lepton_kernels.use(nope="eager")
    with pytest.raises(ValueError, match=r"no implementation 'cuda'.*eager, gpu, fast"):
        lepton_kernels.use(toy_scale="cuda")
    with pytest.raises(ValueError, match="kernels="):
        registry.engine_kernels({"toy_scale": "nope"})
    monkeypatch.setenv("LEPTON_KERNELS", "toy_scale=nope")
    with pytest.raises(ValueError, match="LEPTON_KERNELS"):
        toy[0](torch.ones(4))


def test_duplicate_registration_refused(toy):
    with pytest.raises(ValueError, match="already"):
        registry.register_op("toy_scale", lambda x: x)
    with pytest.raises(ValueError, match="already"):
        registry.register_impl("toy_scale", "fast", lambda x: x, device_types=["cpu"])


def test_lazy_impl_is_imported_on_first_use(toy):
    op, _ = toy
    impl = registry.register_impl("toy_scale", "lazy", "torch:neg", device_types=["cpu"])
    assert impl.fn == "torch:neg"
    with lepton_kernels.use(toy_scale="lazy"):
        assert torch.equal(op(torch.ones(2)), -torch.ones(2))
    assert impl.fn is torch.neg


def test_triton_eligible_on_cpu_only_explicitly_under_interpreter(toy, monkeypatch):
    op, _ = toy
    registry.register_impl("toy_scale", "tri", lambda x: x * 2, device_types=["cuda"],
                           interpret_on_cpu=True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    registry.clear_cache()
    assert op.select(torch.ones(3)) == "eager"  # automatic choice on cpu stays eager
    with lepton_kernels.use(toy_scale="tri"):
        assert op.select(torch.ones(3)) == "tri"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with lepton_kernels.use(toy_scale="tri"):
        with pytest.raises(lepton_kernels.KernelUnavailableError, match="TRITON_INTERPRET=1"):
            op(torch.ones(3))


def test_describe_lists_every_impl_with_a_reason(toy):
    text = lepton_kernels.describe()
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["op", "impl", "usable"]
    gpu_line = next(l for l in lines if l.startswith("toy_scale") and " gpu " in l)
    if not torch.cuda.is_available():
        assert " no " in gpu_line and "no cuda device" in gpu_line
    for name in lepton_kernels.list_ops():
        assert any(l.startswith(name + " ") and " eager " in l for l in lines), name
