"""Registry: public ops as real functions, selection by declared priority, the cached choice and
what invalidates it, the three override layers, lazy loading and the error messages."""

import ast
import importlib
import inspect
import os
import pickle
import pkgutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import lepton_kernels
from lepton_kernels import registry

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def toy():
    """A throwaway op 'toy_scale' (x * 2) with a fake cpu 'fast' impl and a cuda-only 'gpu' impl."""
    calls = []

    def toy_scale(x):
        """x -> 2x."""
        calls.append("eager")
        return x * 2

    def fast(x):
        calls.append("fast")
        return x + x

    op = registry.register_op("toy_scale", toy_scale)
    registry.register_impl(op, "gpu", lambda x: x * 2, device_types=["cuda"])
    registry.register_impl(op, "fast", fast, device_types=["cpu"], dtypes=[torch.float32],
                           supports=lambda x: True if x.shape[-1] % 2 == 0 else "odd last dim")
    yield op, calls
    registry.unregister_op("toy_scale")


def test_every_op_of_the_design_is_registered():
    expected = {"rms_norm", "layer_norm", "rotary_embedding", "silu_and_mul", "gelu_and_mul",
                "flash_attention", "paged_attention", "reshape_and_cache", "copy_blocks",
                "quantize", "dequantize", "quant_matmul"}
    assert expected <= set(lepton_kernels.list_ops())
    for name in expected:
        assert getattr(lepton_kernels, name) is registry.get_op(name)
        assert registry.get_op(name).sample_inputs is not None, name


@pytest.mark.parametrize("name", lepton_kernels.list_ops())
def test_public_op_carries_its_spec_name_signature_and_docstring(name):
    op = getattr(lepton_kernels, name)
    spec = op.eager
    assert inspect.isfunction(spec) and spec.__name__ == name == op.__name__
    assert op.__wrapped__ is spec
    assert inspect.signature(op) == inspect.signature(spec)
    assert op.__doc__ == spec.__doc__ and op.__doc__
    assert op.__module__ == spec.__module__
    assert pickle.loads(pickle.dumps(op)) is op


def test_all_lists_every_op_as_the_function_of_its_op_file():
    ops = set(lepton_kernels.list_ops())
    assert ops <= set(lepton_kernels.__all__)
    for name in ops:
        op = getattr(lepton_kernels, name)
        assert op.__module__.startswith("lepton_kernels.ops.")
        assert getattr(importlib.import_module(op.__module__), name) is op
    # Bound by explicit imports an editor can follow, one per op, from every op module.
    tree = ast.parse((ROOT / "lepton_kernels" / "__init__.py").read_text())
    imported = {alias.name: node.module for node in tree.body if isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith("ops.") for alias in node.names}
    assert set(imported) == ops
    modules = {m.name for m in pkgutil.iter_modules([str(ROOT / "lepton_kernels" / "ops")])
               if not m.name.startswith("_")}
    assert {module.removeprefix("ops.") for module in imported.values()} == modules


def test_arguments_reach_the_implementation_as_the_spec_binds_them():
    seen = []

    def toy_affine(x, scale=2.0, *, shift=0.0):
        return x * scale + shift

    def fast(x, scale=-1.0, *, shift=-1.0):   # other defaults: the spec's must win
        seen.append((scale, shift))
        return x * scale + shift

    op = registry.register_op("toy_affine", toy_affine)
    try:
        registry.register_impl(op, "fast", fast, device_types=["cpu"])
        x = torch.ones(2)
        assert torch.equal(op(x), torch.full((2,), 2.0))
        assert torch.equal(op(x=x, scale=3.0), torch.full((2,), 3.0))
        assert torch.equal(op(x, shift=1.0), torch.full((2,), 3.0))
        assert seen == [(2.0, 0.0), (3.0, 0.0), (2.0, 1.0)]
        with pytest.raises(TypeError):
            op(x, 1.0, 2.0)   # shift is keyword-only, as in the spec
    finally:
        registry.unregister_op("toy_affine")
    lam = registry.register_op("toy_lambda", lambda x, k=3: x * k)
    try:
        assert lam(2) == 6 and str(inspect.signature(lam)) == "(x, k=3)"
    finally:
        registry.unregister_op("toy_lambda")


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


def test_priority_orders_per_device_and_dtype(toy):
    op, calls = toy
    # 'faster' beats 'fast' on cpu except for float16, where its declared priority is lower.
    registry.register_impl(op, "faster", lambda x: calls.append("faster") or x * 2, device_types=["cpu"],
                           priority={"cpu": 10, ("cpu", torch.float16): -1})
    registry.register_impl(op, "tie", lambda x: x * 2, device_types=["cpu"])   # priority 0 like 'fast'
    assert op.priority_order("cpu", torch.float32) == ["faster", "fast", "tie", "eager"]
    assert op.priority_order("cpu", torch.float16) == ["tie", "faster", "eager"]
    assert op.priority_order("cuda") == ["gpu", "eager"]
    op(torch.ones(4))
    assert op.select(torch.ones(4, dtype=torch.float16)) == "tie"
    assert calls == ["faster"]
    assert lepton_kernels.describe().count("cpu: faster > fast > tie > eager;") == 1


def test_ext_goes_before_triton_for_reshape_and_cache_on_cuda():
    op = registry.get_op("reshape_and_cache")
    assert op.get_impl("ext").rank("cuda") > op.get_impl("triton").rank("cuda")
    expected = ["ext", "triton", "eager"] if "cuda" in op.get_impl("ext").device_types else ["triton", "eager"]
    assert op.priority_order("cuda", torch.float16) == expected


def test_choice_is_cached_per_device_and_dtype(toy):
    op, _ = toy
    checks = []
    registry.register_impl(op, "counted", lambda x: x * 2, device_types=["cpu"], priority=-1,
                           available=lambda: checks.append(1))
    for _ in range(3):
        op(torch.ones(3))      # 'fast' refuses odd sizes per call; 'counted' is the cached fallback
    assert op.select(torch.ones(3)) == "counted" and len(checks) == 1
    op(torch.ones(3, dtype=torch.float16))   # another dtype: another plan
    assert len(checks) == 2


def test_clear_cache_forgets_the_choice(toy):
    op, _ = toy
    reason = ["not today"]
    registry.register_impl(op, "flaky", lambda x: x * 2, device_types=["cpu"], priority=5,
                           available=lambda: reason[0])
    assert op.select(torch.ones(4)) == "fast"
    reason[0] = None
    assert op.select(torch.ones(4)) == "fast"   # cached
    registry.clear_cache()
    assert op.select(torch.ones(4)) == "flaky"


def test_overrides_invalidate_the_cached_choice(toy, monkeypatch):
    op, calls = toy
    x = torch.ones(4)
    op(x)
    with lepton_kernels.use(toy_scale="eager"):
        op(x)
    with lepton_kernels.engine_kernels({"toy_scale": "eager"}):
        op(x)
    op(x)
    monkeypatch.setenv("LEPTON_KERNELS", "toy_scale=eager")
    op(x)
    monkeypatch.setenv("LEPTON_KERNELS", "")
    op(x)
    assert calls == ["fast", "eager", "eager", "fast", "eager", "fast"]


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
        assert registry.current_overrides()["toy_scale"] == "fast"
        with lepton_kernels.use(toy_scale="eager"):
            assert op.select(x) == "eager"
    assert op.select(x) == "eager"


def test_wildcard_applies_only_to_ops_that_have_the_impl(toy):
    op, _ = toy
    automatic = lepton_kernels.rms_norm.select(torch.ones(2, 4), torch.ones(4))   # cpu, or eager
    with lepton_kernels.use("fast"):
        assert op.select(torch.ones(4)) == "fast"
        # rms_norm has no 'fast': the wildcard leaves its automatic choice alone
        assert lepton_kernels.rms_norm.select(torch.ones(2, 4), torch.ones(4)) == automatic


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
    for _ in range(2):   # raised on every call until the variable is fixed
        with pytest.raises(ValueError, match="LEPTON_KERNELS"):
            toy[0](torch.ones(4))


def test_duplicate_registration_refused(toy):
    with pytest.raises(ValueError, match="already"):
        registry.register_op("toy_scale", lambda x: x)
    with pytest.raises(ValueError, match="already"):
        registry.register_impl("toy_scale", "fast", lambda x: x, device_types=["cpu"])


def test_lazy_impl_is_loaded_on_first_call(toy):
    op, _ = toy
    loads = []

    def load():
        loads.append(1)
        return torch.neg

    impl = registry.register_impl(op, "lazy", load=load, device_types=["cpu"])
    with lepton_kernels.use(toy_scale="lazy"):
        assert op.select(torch.ones(2)) == "lazy" and impl.fn is None and not loads
        assert torch.equal(op(torch.ones(2)), -torch.ones(2))
        op(torch.ones(2))
    assert impl.fn is torch.neg and loads == [1]


def test_registering_a_triton_kernel_imports_no_triton():
    code = """
import sys
import torch
import lepton_kernels as lk
from lepton_kernels.backends import register_triton

def toy_double(x):
    return x * 2

op = lk.register_op("toy_double", toy_double)
def load():
    from lepton_kernels.triton_kernels.activation import silu_and_mul as launcher
    return lambda x: x * 2
register_triton(op, load)
lk.rms_norm(torch.ones(2, 8), torch.ones(8))
print(sorted(m for m in sys.modules if m == "triton" or m.startswith(("triton.", "lepton_kernels.triton_kernels"))))
with lk.use(toy_double="triton"):
    assert torch.equal(op(torch.ones(3)), torch.full((3,), 2.0))
print("triton" in sys.modules)
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["[]", "True"]


def test_triton_eligible_on_cpu_only_explicitly_under_interpreter(toy, monkeypatch):
    op, _ = toy
    registry.register_impl(op, "tri", lambda x: x * 2, device_types=["cuda"], interpret_on_cpu=True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    registry.clear_cache()
    assert op.select(torch.ones(3)) == "eager"  # automatic choice on cpu stays eager
    with lepton_kernels.use(toy_scale="tri"):
        assert op.select(torch.ones(3)) == "tri"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    registry.clear_cache()
    with lepton_kernels.use(toy_scale="tri"):
        with pytest.raises(lepton_kernels.KernelUnavailableError, match="TRITON_INTERPRET=1"):
            op(torch.ones(3))


def test_describe_lists_every_impl_and_the_order_per_device(toy):
    text = lepton_kernels.describe()
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["op", "impl", "usable"]
    gpu_line = next(l for l in lines if l.startswith("toy_scale") and " gpu " in l)
    if not torch.cuda.is_available():
        assert " no " in gpu_line and "no cuda device" in gpu_line
    for name in lepton_kernels.list_ops():
        assert any(l.startswith(name + " ") and " eager " in l for l in lines), name
    order = next(l for l in lines[lines.index(next(l for l in lines if l.startswith("selection order"))):]
                 if l.startswith("toy_scale "))
    assert order.split(None, 1)[1] == "cpu: fast > eager;  cuda: gpu > eager"
