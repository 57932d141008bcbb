"""Implementations and plans: what an op runs for one (device, dtype, override state), decided
once and cached.

An :class:`Impl` is one accelerated implementation of an op and where it can run. A
:class:`Plan` holds the implementation to try first (``fn``) and its per-call ``supports`` check
(``check``, None when there is none); when the check refuses, ``call(args, kwargs)`` goes down the
rest of the priority order (eager last) or, for a forced implementation, raises. ``pick(args,
kwargs)`` names what a call would run (``Op.select``). The op's dispatcher (:func:`make_dispatcher`)
finds the plan and runs ``check`` and ``fn`` inline with the spec's parameters.
"""

from __future__ import annotations

import inspect
import linecache
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from . import overrides

if TYPE_CHECKING:
    from .registry import Op

logger = logging.getLogger("lepton_kernels.registry")

EAGER = "eager"


class KernelUnavailableError(RuntimeError):
    """An explicitly requested implementation cannot run on these inputs or on this machine."""


def triton_interpret() -> bool:
    """True when Triton runs through its CPU interpreter (read at kernel decoration time)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(eq=False)
class Impl:
    """An accelerated implementation of an op.

    ``fn`` is the implementation, or None until ``load()`` (a function that imports it and
    returns it) has run on first use: registering a Triton kernel never imports triton.
    ``available()`` returns ``None`` when the backing library is usable and a reason string
    otherwise. ``supports(*args, **kwargs)`` returns ``True`` for inputs it handles, else
    ``False`` or a string saying why not; it runs on every call, so it must stay cheap.
    ``priority``: higher runs first; an int, or a mapping from a device type or a
    (device type, dtype) pair to an int (missing keys: 0). ``interpret_on_cpu`` marks Triton
    kernels: under ``TRITON_INTERPRET=1`` they may run on CPU tensors, but only when asked for
    explicitly (the interpreter verifies, it is not fast).
    """

    name: str
    device_types: frozenset[str]
    dtypes: frozenset[torch.dtype] | None = None
    available: Callable[[], str | None] = lambda: None
    supports: Callable[..., Any] | None = None
    interpret_on_cpu: bool = False
    priority: int | Mapping[Any, int] = 0
    fn: Callable | None = None
    load: Callable[[], Callable] | None = None

    def resolve(self) -> Callable:
        """The implementation, loaded on first use."""
        if self.fn is None:
            self.fn = self.load()
        return self.fn

    def rank(self, device_type: str, dtype: torch.dtype | None = None) -> int:
        """This implementation's priority on (device_type, dtype): higher runs first."""
        if isinstance(self.priority, int):
            return self.priority
        if dtype is not None and (device_type, dtype) in self.priority:
            return self.priority[(device_type, dtype)]
        return self.priority.get(device_type, 0)

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


class Plan:
    """``fn`` runs when ``check`` (None: nothing to check) accepts the arguments; otherwise, or
    while ``fn`` is not loaded yet (None), ``call(args, kwargs)`` decides. The dispatcher runs
    the first part inline, so the common case costs no frame of its own."""

    __slots__ = ("fn", "check", "call", "pick")

    def __init__(self, fn: Callable | None, check: Callable[..., Any] | None,
                 call: Callable[[tuple, dict], Any], pick: Callable[[tuple, dict], str]):
        self.fn = fn
        self.check = check
        self.call = call
        self.pick = pick


def _loaded(plan: Plan, impl: Impl) -> Callable:
    """impl's function, loading it on first use; from then on the plan calls it inline."""
    plan.fn = fn = impl.fn or impl.resolve()
    return fn


def _fixed(name: str, fn: Callable | None, impl: Impl | None = None) -> Plan:
    """Always the same function; an implementation not loaded yet is loaded by the first call."""
    plan = Plan(fn, None, lambda args, kwargs: _loaded(plan, impl)(*args, **kwargs),
                lambda args, kwargs: name)
    return plan


def _checked(op: Op, chain: list[Impl]) -> Plan:
    """Per call: the first implementation of ``chain`` whose supports() accepts, else eager."""
    eager, name, first = op.eager, op.name, chain[0]

    def call(args, kwargs):
        for impl in chain:
            ok = True if impl.supports is None else impl.supports(*args, **kwargs)
            if ok is True:
                return (_loaded(plan, impl) if impl is first else impl.fn or impl.resolve())(*args, **kwargs)
            logger.debug("%s: %s does not support these inputs: %s", name, impl.name, ok)
        return eager(*args, **kwargs)

    def pick(args, kwargs) -> str:
        for impl in chain:
            if impl.supports is None or impl.supports(*args, **kwargs) is True:
                return impl.name
        return EAGER

    plan = Plan(first.fn, first.supports, call, pick)
    return plan


def _explicit(op: Op, name: str, device_type: str, dtype: torch.dtype | None) -> Plan:
    """A forced implementation: it runs, or the call raises KernelUnavailableError with why."""
    impl = op.get_impl(name)
    if impl is None:
        return _fixed(EAGER, op.eager)

    def refuse(reason) -> None:
        raise KernelUnavailableError(
            f"{op.name}: implementation {name!r} was requested but cannot run: {reason}")

    reason = impl.why_not(device_type, dtype, explicit=True)
    if reason is not None:
        return Plan(None, None, lambda args, kwargs: refuse(reason), lambda args, kwargs: refuse(reason))
    if impl.supports is None:
        return _fixed(name, impl.fn, impl)

    def check(args, kwargs) -> str:
        ok = impl.supports(*args, **kwargs)
        if ok is not True:
            refuse(ok or "inputs not supported")
        return name

    def call(args, kwargs):
        check(args, kwargs)
        return _loaded(plan, impl)(*args, **kwargs)

    plan = Plan(impl.fn, impl.supports, call, check)
    return plan


def build_plan(op: Op, device_type: str, dtype: torch.dtype | None, forced: str | None) -> Plan:
    """The plan for calls on (device_type, dtype) with override ``forced`` (None: automatic)."""
    if forced is not None:
        return _explicit(op, forced, device_type, dtype)
    chain = []
    for name in op.priority_order(device_type, dtype)[:-1]:
        impl = op.get_impl(name)
        reason = impl.why_not(device_type, dtype, explicit=False)
        if reason is not None:
            logger.debug("%s: %s not used on %s/%s: %s", op.name, name, device_type, dtype, reason)
            continue
        chain.append(impl)
        if impl.supports is None:
            break   # nothing after an implementation that takes every input can run
    if not chain:
        return _fixed(EAGER, op.eager)
    if len(chain) == 1 and chain[0].supports is None:
        return _fixed(chain[0].name, chain[0].fn, chain[0])
    return _checked(op, chain)


def make_dispatcher(spec: Callable, dispatch_arg: str | None, plans: dict, slow: Callable,
                    sync_env: Callable[[], None]) -> Callable:
    """The function an op call runs: ``spec``'s parameters, then one dict lookup and the plan.

    It is generated with the spec's exact parameter list (as dataclasses generates __init__):
    forwarding ``*args, **kwargs`` through a wrapper costs more than the rest of the dispatch.
    Every argument is passed on positionally (keyword-only ones by keyword), defaults included,
    so an implementation sees exactly the spec's contract. Plans are looked up by the dispatch
    argument's (device, dtype) and the override state; anything else (no tensor there, a cache
    miss, ``dispatch_arg`` None: derived by the op) takes ``slow(args, kwargs)``.
    """
    sig = inspect.signature(spec)
    params, positional, keywords, defaults = [], [], [], {}
    kinds = [p.kind for p in sig.parameters.values()]
    if any(k in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) for k in kinds):
        raise ValueError(f"{spec.__name__}: an op's spec takes named parameters, not *args/**kwargs")
    if any(name.startswith("_") for name in sig.parameters):   # the dispatcher's own names
        raise ValueError(f"{spec.__name__}: an op's parameter names must not start with '_'")
    for i, p in enumerate(sig.parameters.values()):
        if p.kind is inspect.Parameter.KEYWORD_ONLY and "*" not in params:
            params.append("*")
        text = p.name
        if p.default is not p.empty:
            defaults[f"_default_{i}"] = p.default
            text += f"=_default_{i}"
        params.append(text)
        if p.kind is inspect.Parameter.POSITIONAL_ONLY and (i + 1 == len(kinds) or kinds[i + 1] is not p.kind):
            params.append("/")
        (keywords if p.kind is inspect.Parameter.KEYWORD_ONLY else positional).append(p.name)
    args = "".join(f"{n}, " for n in positional)
    kwargs = ", ".join(f"{n!r}: {n}" for n in keywords)
    call = ", ".join(positional + [f"{n}={n}" for n in keywords])
    lookup = (f"_plan = _plans[{dispatch_arg}.device, {dispatch_arg}.dtype, _current()]"
              if dispatch_arg else "raise KeyError")
    name = spec.__name__ if spec.__name__.isidentifier() else "dispatch"   # a lambda is "<lambda>"
    source = f"""def {name}({", ".join(params)}):
    if _env_get(_env_key) is not _overrides.env_raw:
        _sync_env()
    try:
        {lookup}
    except (AttributeError, TypeError, KeyError):
        _plan = _slow(({args}), {{{kwargs}}})
    _fn, _check = _plan.fn, _plan.check
    if _fn is not None and (_check is None or _check({call}) is True):
        return _fn({call})
    return _plan.call(({args}), {{{kwargs}}})
"""
    filename = f"<lepton_kernels dispatcher {spec.__module__}.{spec.__name__}>"
    namespace = {"_plans": plans, "_slow": slow, "_sync_env": sync_env, "_overrides": overrides,
                 "_env_get": overrides.ENV_BACKING.get, "_env_key": overrides.ENV_KEY,
                 "_current": overrides.CURRENT.get, **defaults}
    exec(compile(source, filename, "exec"), namespace)
    # Tracebacks through the dispatcher show its source.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    return namespace[name]
