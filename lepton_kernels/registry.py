"""The kernel registry: one eager spec per op, accelerated implementations beside it.

An op is a name, an eager PyTorch function (the spec, the oracle in tests, the fallback) and
accelerated implementations (``triton``, ``ext``, ``cpu``), each declaring the device types and
dtypes it runs on, a ``priority`` (per device type, optionally per (device type, dtype)), an
availability check and optionally a per-call ``supports(...)`` check. A call runs the first
implementation, in descending priority for the inputs' device type and dtype (ties: registration
order), that is available and supports the inputs; eager is the last resort.

The choice is made once per (op, device, dtype, override state) and cached as a plan, so a call
costs a dict lookup, the ``supports`` checks that depend on shapes, and nothing else
(benchmarks/test_registry_overhead.py measures it). :func:`clear_cache` forgets the plans
(needed after TRITON_INTERPRET or an availability changes; overrides invalidate by themselves).

Overrides, strongest first:
    1. ``with lepton_kernels.use(rms_norm="eager"): ...``    (scoped, per thread / asyncio task)
    2. ``with lepton_kernels.engine_kernels({...})``          (what ``Engine(kernels=...)`` uses)
    3. ``LEPTON_KERNELS="rms_norm=eager,paged_attention=triton"`` (``*=triton`` for every op)
An explicit request that cannot run raises :class:`KernelUnavailableError`; automatic selection
falls back quietly with a debug log line. Plans live in :mod:`lepton_kernels.dispatch`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Generic, Mapping, ParamSpec, Sequence, TypeVar, overload

import torch

from . import overrides
from .dispatch import (EAGER, Impl, KernelUnavailableError, Plan, build_plan, make_dispatcher,
                       triton_interpret)
from .overrides import ALL_OPS

__all__ = ["ALL_OPS", "EAGER", "Impl", "KernelUnavailableError", "Op", "SampleInput", "clear_cache",
           "current_overrides", "engine_kernels", "get_op", "list_ops", "register_impl", "register_op",
           "triton_interpret", "unregister_op", "use"]

P = ParamSpec("P")
R = TypeVar("R")
# Distinct (device, dtype, override state) keys an op keeps plans for before starting over.
MAX_PLANS = 256
_CPU = torch.device("cpu")
_CURRENT = overrides.CURRENT


@dataclass
class SampleInput:
    """One call's worth of inputs for tests and benchmarks: ``op(*args, **kwargs)``."""

    name: str
    args: tuple
    kwargs: dict = field(default_factory=dict)


class Op(functools.partial, Generic[P, R]):
    """A registered op: calling it dispatches. It carries its spec's name, signature and
    docstring (``inspect.signature(op)`` is the spec's); ``op.eager`` is the spec itself.

    It is a ``functools.partial`` of its dispatcher (see :func:`~lepton_kernels.dispatch.make_dispatcher`)
    because a partial is called from C: a Python ``__call__`` would add more than a tenth of a
    microsecond to every call.
    """

    if TYPE_CHECKING:   # what editors and type checkers see; the call itself is the partial's
        def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R: ...

    def __new__(cls, name: str, eager: Callable[P, R], sample_inputs: Callable | None = None,
                dispatch_arg: str | None = None, dispatch_tensor: Callable | None = None):
        signature = inspect.signature(eager)
        dispatch_arg = dispatch_arg or next(iter(signature.parameters))
        plans: dict[tuple, Plan] = {}
        dispatcher = make_dispatcher(eager, None if dispatch_tensor else dispatch_arg, plans,
                                     lambda args, kwargs: self._plan(args, kwargs),
                                     lambda: overrides.sync_env(_OPS))
        self = super().__new__(cls, dispatcher)
        functools.update_wrapper(self, eager)
        self.__signature__ = signature
        self.name = name
        self.eager = eager
        self.sample_inputs = sample_inputs
        self.impls: list[Impl] = []
        self._plans = plans
        self._dispatch_arg = dispatch_arg
        self._dispatch_tensor = dispatch_tensor
        self._pos = list(signature.parameters).index(dispatch_arg)
        return self

    def select(self, *args, **kwargs) -> str:
        """Name of the implementation a call with these inputs would run."""
        overrides.sync_env(_OPS)
        return self._plan(args, kwargs).pick(args, kwargs)

    def dispatch_key(self, *args, **kwargs) -> tuple[str, torch.dtype | None]:
        """(device type, dtype) of the tensor a call with these inputs dispatches on."""
        t = self._dispatch_value(args, kwargs)
        return ("cpu", None) if t is None else (t.device.type, t.dtype)

    def _dispatch_value(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        value = args[self._pos] if len(args) > self._pos else kwargs.get(self._dispatch_arg)
        if self._dispatch_tensor is not None:
            value = self._dispatch_tensor(value)
        if isinstance(value, (list, tuple)) and value:
            value = value[0]
        return value if isinstance(value, torch.Tensor) else None

    def _plan(self, args: tuple, kwargs: dict) -> Plan:
        t = self._dispatch_value(args, kwargs)
        key = (_CPU, None) if t is None else (t.device, t.dtype)
        key = (*key, _CURRENT.get())
        plan = self._plans.get(key)
        if plan is None:
            forced = overrides.forced(self.name, self.impl_names(), key[2])
            plan = build_plan(self, key[0].type, key[1], forced)
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def priority_order(self, device_type: str, dtype: torch.dtype | None = None) -> list[str]:
        """Implementation names in the order automatic selection tries them on (device_type,
        dtype), as declared (availability on this machine aside); eager is always last."""
        declared = [i for i in self.impls if device_type in i.device_types
                    and (dtype is None or i.dtypes is None or dtype in i.dtypes)]
        declared.sort(key=lambda i: -i.rank(device_type, dtype))   # stable: ties keep order
        return [i.name for i in declared] + [EAGER]

    def impl_names(self) -> list[str]:
        return [EAGER] + [impl.name for impl in self.impls]

    def get_impl(self, name: str) -> Impl | None:
        """The accelerated Impl called ``name``; None for eager. Unknown names raise ValueError."""
        if name == EAGER:
            return None
        for impl in self.impls:
            if impl.name == name:
                return impl
        raise ValueError(f"op {self.name!r} has no implementation {name!r}; "
                         f"valid: {', '.join(self.impl_names())}")

    def set_sample_inputs(self, fn: Callable[..., list[SampleInput]]) -> Callable[..., list[SampleInput]]:
        """Decorator: ``fn(device, dtype)`` returns the :class:`SampleInput` list (odd sizes
        included) that the generic tests and benchmarks iterate over."""
        self.sample_inputs = fn
        return fn

    def clear_cache(self) -> None:
        self._plans.clear()

    def __reduce__(self):
        return get_op, (self.name,)

    def __repr__(self) -> str:
        return f"<lepton_kernels op {self.name}: {', '.join(self.impl_names())}>"


_OPS: dict[str, Op] = {}
_LOCK = threading.Lock()


@overload
def register_op(eager: Callable[P, R], /) -> Op[P, R]: ...
@overload
def register_op(name: str, eager: Callable[P, R], /, *, sample_inputs: Callable | None = None,
                dispatch_arg: str | None = None, dispatch_tensor: Callable | None = None) -> Op[P, R]: ...
@overload
def register_op(name: str | None = None, /, *, sample_inputs: Callable | None = None,
                dispatch_arg: str | None = None,
                dispatch_tensor: Callable | None = None) -> Callable[[Callable[P, R]], Op[P, R]]: ...


def register_op(name=None, eager=None, /, *, sample_inputs=None, dispatch_arg=None, dispatch_tensor=None):
    """Register an op from its eager spec; returns the :class:`Op` that dispatches it.

        @register_op                      # named after the function
        def rms_norm(x, weight, eps=1e-6, residual=None): ...

    or ``@register_op("name", dispatch_arg="q")``, or ``register_op("name", eager_fn)``.
    The dispatch tensor (whose device and dtype select the implementation) is the argument
    ``dispatch_arg`` (default: the first parameter; a list's first element);
    ``dispatch_tensor(value)`` derives it from that argument when it is not a tensor.
    """
    def add(op_name: str, fn: Callable) -> Op:
        with _LOCK:
            if op_name in _OPS:
                raise ValueError(f"op {op_name!r} is already registered")
            op = Op(op_name, fn, sample_inputs, dispatch_arg, dispatch_tensor)
            _OPS[op_name] = op
            return op

    if callable(name):
        return add(name.__name__, name)
    if eager is not None:
        return add(name, eager)
    return lambda fn: add(name or fn.__name__, fn)


def register_impl(op: Op | str, name: str, fn: Callable | None = None, *,
                  load: Callable[[], Callable] | None = None, device_types: Sequence[str],
                  dtypes: Sequence[torch.dtype] | None = None,
                  available: Callable[[], str | None] | None = None,
                  supports: Callable[..., Any] | None = None,
                  interpret_on_cpu: bool = False, priority: int | Mapping[Any, int] = 0) -> Impl:
    """Add an accelerated implementation: ``fn`` itself, or ``load``, a function returning it
    that runs on first use (so the module holding the kernel is imported only then)."""
    if name == EAGER:
        raise ValueError("'eager' is the op's spec; register it with register_op")
    if (fn is None) == (load is None):
        raise ValueError(f"{name}: pass exactly one of fn and load")
    target = get_op(op) if isinstance(op, str) else op
    impl = Impl(name, frozenset(device_types), None if dtypes is None else frozenset(dtypes),
                available or (lambda: None), supports, interpret_on_cpu, priority, fn, load)
    with _LOCK:
        if any(existing.name == name for existing in target.impls):
            raise ValueError(f"op {target.name!r} already has an implementation {name!r}")
        target.impls.append(impl)
        target.clear_cache()
    return impl


def get_op(name: str) -> Op:
    try:
        return _OPS[name]
    except KeyError:
        raise ValueError(f"unknown op {name!r}; valid ops: {', '.join(sorted(_OPS))}") from None


def unregister_op(name: str) -> None:
    """Remove an op (tests register throwaway ones)."""
    with _LOCK:
        del _OPS[name]


def list_ops() -> list[str]:
    return sorted(_OPS)


def clear_cache() -> None:
    """Forget every cached choice (after an availability or TRITON_INTERPRET change)."""
    for op in list(_OPS.values()):
        op.clear_cache()


overrides.on_env_change(clear_cache)


def use(impl: str | None = None, /, **per_op: str) -> contextlib.AbstractContextManager[None]:
    """Force implementations inside a ``with`` block: ``use(rms_norm="eager")``, or
    ``use("triton")`` for every op that has one. Nestable; inner blocks win; the setting is
    local to the current thread or asyncio task, so concurrent requests do not see each other's."""
    mapping = dict(per_op)
    if impl is not None:
        mapping[ALL_OPS] = impl
    return overrides.push("use", overrides.validate(_OPS, mapping, "use()"))


def engine_kernels(mapping: dict[str, str] | None) -> contextlib.AbstractContextManager[None]:
    """The ``Engine(kernels=...)`` layer: weaker than :func:`use`, stronger than the env."""
    return overrides.push("engine", overrides.validate(_OPS, dict(mapping or {}), "kernels="))


def current_overrides() -> dict[str, str]:
    """The override in force for each op that has one (all three layers merged)."""
    overrides.sync_env(_OPS)
    state = _CURRENT.get()
    found = {name: overrides.forced(name, op.impl_names(), state) for name, op in _OPS.items()}
    return {name: impl for name, impl in found.items() if impl is not None}
