"""The kernel registry: one eager spec per op, accelerated implementations beside it.

An op is a name, an eager PyTorch function (the spec, the oracle in tests, the fallback) and an
ordered list of accelerated implementations (``triton``, ``ext``). Calling an op picks the first
implementation whose device type, dtype, availability and ``supports(...)`` check hold for the
inputs; eager is the last resort. Static conditions are resolved once per (device type, dtype)
and cached, so a decode loop only pays a dict lookup plus the cheap shape checks.

Overrides, strongest first:
    1. ``with lepton_kernels.use(rms_norm="eager"): ...``    (scoped, per thread / asyncio task)
    2. ``with lepton_kernels.registry.engine_kernels({...})`` (what ``Engine(kernels=...)`` uses)
    3. ``LEPTON_KERNELS="rms_norm=eager,paged_attention=triton"`` (``*=triton`` for every op)
An explicit request that cannot run raises :class:`KernelUnavailableError`; automatic selection
falls back quietly with a debug log line.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

logger = logging.getLogger(__name__)

EAGER = "eager"
ALL_OPS = "*"


class KernelUnavailableError(RuntimeError):
    """An explicitly requested implementation cannot run on these inputs or on this machine."""


@dataclass
class SampleInput:
    """One call's worth of inputs for tests and benchmarks: ``op(*args, **kwargs)``."""

    name: str
    args: tuple
    kwargs: dict = field(default_factory=dict)


def triton_interpret() -> bool:
    """True when Triton runs through its CPU interpreter (read at kernel decoration time)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass
class Impl:
    """An accelerated implementation of an op.

    ``fn`` is a callable or a lazy ``"module:attr"`` reference, imported on first use so that
    registering a triton kernel never imports triton. ``available()`` returns ``None`` when the
    backing library is usable and a reason string otherwise. ``supports(*args, **kwargs)``
    returns ``True`` for inputs it handles, else ``False`` or a string saying why not.
    ``interpret_on_cpu`` marks Triton kernels: under ``TRITON_INTERPRET=1`` they may run on CPU
    tensors, but only when asked for explicitly (the interpreter verifies, it is not fast).
    """

    name: str
    fn: Callable | str
    device_types: frozenset[str]
    dtypes: frozenset[torch.dtype] | None = None
    available: Callable[[], str | None] = lambda: None
    supports: Callable[..., Any] | None = None
    interpret_on_cpu: bool = False

    def resolve(self) -> Callable:
        if isinstance(self.fn, str):
            module, _, attr = self.fn.partition(":")
            self.fn = getattr(importlib.import_module(module), attr)
        return self.fn

    def why_not(self, device_type: str, dtype: torch.dtype | None, explicit: bool) -> str | None:
        """Reason this implementation cannot run for (device_type, dtype), or None if it can."""
        reason = self.available()
        if reason is not None:
            return reason
        on_interpreter = self.interpret_on_cpu and device_type == "cpu" and triton_interpret()
        if on_interpreter and not explicit:
            return "TRITON_INTERPRET=1 makes it runnable on cpu, but only when asked for explicitly"
        if device_type not in self.device_types and not on_interpreter:
            hint = " (set TRITON_INTERPRET=1 to run it on cpu)" if self.interpret_on_cpu else ""
            return f"runs on {'/'.join(sorted(self.device_types))}, not {device_type}{hint}"
        if self.dtypes is not None and dtype is not None and dtype not in self.dtypes:
            names = ", ".join(sorted(str(d).removeprefix("torch.") for d in self.dtypes))
            return f"dtype {str(dtype).removeprefix('torch.')} not supported (supports {names})"
        return None


def _first_tensor(args: Sequence, kwargs: dict) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            return value[0]
    return None


class Op:
    """A registered op. Calling it dispatches; ``op.eager`` is the spec itself."""

    def __init__(self, name: str, eager: Callable, sample_inputs: Callable | None,
                 dispatch_tensor: Callable | None, doc: str | None):
        self.name = name
        self.eager = eager
        self.sample_inputs = sample_inputs
        self.impls: list[Impl] = []
        self._dispatch_tensor = dispatch_tensor or _first_tensor
        self._auto: dict[tuple[str, torch.dtype | None], list[Impl]] = {}
        self.__doc__ = doc or eager.__doc__
        self.__name__ = name

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

    def _key(self, args: tuple, kwargs: dict) -> tuple[str, torch.dtype | None]:
        t = self._dispatch_tensor(args, kwargs)
        if t is None:
            return ("cpu", None)
        return (t.device.type, t.dtype)

    def _candidates(self, key: tuple[str, torch.dtype | None]) -> list[Impl]:
        cands = self._auto.get(key)
        if cands is None:
            cands = []
            for impl in self.impls:
                reason = impl.why_not(key[0], key[1], explicit=False)
                if reason is None:
                    cands.append(impl)
                else:
                    logger.debug("%s: %s not used on %s/%s: %s", self.name, impl.name, *key, reason)
            self._auto[key] = cands
        return cands

    def select(self, *args, **kwargs) -> str:
        """Name of the implementation a call with these inputs would run."""
        impl = self._choose(args, kwargs)
        return EAGER if impl is None else impl.name

    def _choose(self, args: tuple, kwargs: dict) -> Impl | None:
        key = self._key(args, kwargs)
        forced = _forced_impl(self.name)
        if forced is not None:
            return self._explicit(forced, key, args, kwargs)
        for impl in self._candidates(key):
            ok = True if impl.supports is None else impl.supports(*args, **kwargs)
            if ok is True:
                return impl
            logger.debug("%s: %s does not support these inputs: %s", self.name, impl.name, ok)
        return None

    def _explicit(self, name: str, key: tuple, args: tuple, kwargs: dict) -> Impl | None:
        impl = self.get_impl(name)
        if impl is None:
            return None
        reason = impl.why_not(key[0], key[1], explicit=True)
        if reason is None and impl.supports is not None:
            ok = impl.supports(*args, **kwargs)
            reason = None if ok is True else (ok or "inputs not supported")
        if reason is not None:
            raise KernelUnavailableError(
                f"{self.name}: implementation {name!r} was requested but cannot run: {reason}")
        return impl

    def __call__(self, *args, **kwargs):
        impl = self._choose(args, kwargs)
        if impl is None:
            return self.eager(*args, **kwargs)
        return impl.resolve()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<lepton_kernels op {self.name}: {', '.join(self.impl_names())}>"


_OPS: dict[str, Op] = {}
_LOCK = threading.Lock()
# Two scoped layers: use() beats the engine's kernels=, which beats the environment.
_SCOPED: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("lepton_use", default={})
_ENGINE: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("lepton_engine", default={})
_ENV_CACHE: tuple[str, dict[str, str]] = ("", {})


def register_op(name: str, eager: Callable, *, sample_inputs: Callable | None = None,
                dispatch_tensor: Callable | None = None, doc: str | None = None) -> Op:
    """Register ``name`` with its eager spec. ``sample_inputs(device, dtype)`` returns a list of
    :class:`SampleInput` (odd sizes included) that tests and benchmarks iterate over."""
    with _LOCK:
        if name in _OPS:
            raise ValueError(f"op {name!r} is already registered")
        op = Op(name, eager, sample_inputs, dispatch_tensor, doc)
        _OPS[name] = op
        return op


def register_impl(op: str, name: str, fn: Callable | str, *, device_types: Sequence[str],
                  dtypes: Sequence[torch.dtype] | None = None,
                  available: Callable[[], str | None] | None = None,
                  supports: Callable[..., Any] | None = None,
                  interpret_on_cpu: bool = False) -> Impl:
    """Add an accelerated implementation; earlier registrations are preferred."""
    if name == EAGER:
        raise ValueError("'eager' is the op's spec; register it with register_op")
    target = get_op(op)
    impl = Impl(name, fn, frozenset(device_types), None if dtypes is None else frozenset(dtypes),
                available or (lambda: None), supports, interpret_on_cpu)
    with _LOCK:
        if any(existing.name == name for existing in target.impls):
            raise ValueError(f"op {op!r} already has an implementation {name!r}")
        target.impls.append(impl)
        target._auto.clear()
    return impl


def get_op(name: str) -> Op:
    try:
        return _OPS[name]
    except KeyError:
        raise ValueError(f"unknown op {name!r}; valid ops: {', '.join(sorted(_OPS))}") from None


def list_ops() -> list[str]:
    return sorted(_OPS)


def clear_cache() -> None:
    """Forget cached choices (after an availability change, e.g. in tests)."""
    for op in _OPS.values():
        op._auto.clear()


def _validate(mapping: dict[str, str], source: str) -> dict[str, str]:
    for op_name, impl_name in mapping.items():
        if op_name == ALL_OPS:
            if not any(impl_name in op.impl_names() for op in _OPS.values()):
                raise ValueError(f"{source}: no op has an implementation {impl_name!r}")
            continue
        try:
            get_op(op_name).get_impl(impl_name)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
    return dict(mapping)


def _parse_env(raw: str) -> dict[str, str]:
    mapping = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        op_name, sep, impl_name = item.partition("=")
        if not sep:
            op_name, impl_name = ALL_OPS, op_name
        mapping[op_name.strip()] = impl_name.strip()
    return _validate(mapping, f"LEPTON_KERNELS={raw!r}")


def _env_overrides() -> dict[str, str]:
    # Cached on the raw string: a changed environment takes effect, an unchanged one costs a get.
    global _ENV_CACHE
    raw = os.environ.get("LEPTON_KERNELS", "")
    if raw != _ENV_CACHE[0]:
        _ENV_CACHE = (raw, _parse_env(raw))
    return _ENV_CACHE[1]


def _lookup(mapping: dict[str, str], op: str) -> str | None:
    impl = mapping.get(op)
    if impl is None and ALL_OPS in mapping and mapping[ALL_OPS] in _OPS[op].impl_names():
        impl = mapping[ALL_OPS]
    return impl


def _forced_impl(op: str) -> str | None:
    for mapping in (_SCOPED.get(), _ENGINE.get(), _env_overrides()):
        if mapping:
            impl = _lookup(mapping, op)
            if impl is not None:
                return impl
    return None


@contextlib.contextmanager
def _scoped(var: contextvars.ContextVar, mapping: dict[str, str]) -> Iterator[None]:
    token = var.set({**var.get(), **mapping})
    try:
        yield
    finally:
        var.reset(token)


def use(impl: str | None = None, /, **per_op: str) -> contextlib.AbstractContextManager:
    """Force implementations inside a ``with`` block: ``use(rms_norm="eager")``, or
    ``use("triton")`` for every op that has one. Nestable; inner blocks win; the setting is
    local to the current thread or asyncio task, so concurrent requests do not see each other's."""
    mapping = dict(per_op)
    if impl is not None:
        mapping[ALL_OPS] = impl
    return _scoped(_SCOPED, _validate(mapping, "use()"))


def engine_kernels(mapping: dict[str, str] | None) -> contextlib.AbstractContextManager:
    """The ``Engine(kernels=...)`` layer: weaker than :func:`use`, stronger than the env."""
    return _scoped(_ENGINE, _validate(dict(mapping or {}), "kernels="))


def current_overrides() -> dict[str, str]:
    """The override in force for each op that has one (all three layers merged)."""
    return {name: impl for name in _OPS if (impl := _forced_impl(name)) is not None}
