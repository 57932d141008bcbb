"""The three override layers of the registry, strongest first: ``use()`` (scoped), the engine's
``kernels=`` (scoped) and the LEPTON_KERNELS environment variable.

The two scoped layers live in one ContextVar (per thread / asyncio task) as an interned
:class:`State`: entering ``use(rms_norm="eager")`` twice yields the same object, so an op's plan
cache, keyed by it, stays small and hits. The environment is re-parsed only when its raw value
changes; checking that costs one dict lookup (see :data:`ENV_BACKING`).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

ALL_OPS = "*"
ENV_VAR = "LEPTON_KERNELS"


@dataclass(frozen=True, eq=False)
class State:
    """The scoped overrides in force: ``use`` beats ``engine``. Compared by identity (interned)."""

    use: Mapping[str, str]
    engine: Mapping[str, str]


CURRENT: contextvars.ContextVar[State | None] = contextvars.ContextVar("lepton_kernels_overrides",
                                                                     default=None)
_INTERNED: dict[tuple, State] = {}


def _environ_backing():
    # os.environ.get costs about a microsecond (it encodes the key and decodes the value in
    # Python). CPython's os.environ keeps the encoded values in a plain dict that every write
    # through os.environ updates (monkeypatch.setenv included), so a get there tells whether the
    # raw value changed. Elsewhere fall back to os.environ itself: correct, just slower.
    data, encode = getattr(os.environ, "_data", None), getattr(os.environ, "encodekey", None)
    if isinstance(data, dict) and callable(encode):
        return data, encode(ENV_VAR)
    return os.environ, ENV_VAR


ENV_BACKING, ENV_KEY = _environ_backing()
env_raw = None                   # raw value behind env_map (None: unset)
env_map: dict[str, str] = {}
_listeners: list[Callable[[], None]] = []


def on_env_change(fn: Callable[[], None]) -> None:
    """Call ``fn`` whenever the parsed LEPTON_KERNELS mapping changes."""
    _listeners.append(fn)


def sync_env(ops: Mapping) -> None:
    """Re-read LEPTON_KERNELS if its raw value changed; a bad value raises ValueError (on every
    call until it is fixed)."""
    global env_raw, env_map
    raw = ENV_BACKING.get(ENV_KEY)
    if raw is env_raw:
        return
    if raw != env_raw:
        text = os.environ.get(ENV_VAR, "")
        mapping = validate(ops, parse_env(text), f"{ENV_VAR}={text!r}")
        changed, env_map = mapping != env_map, mapping
        if changed:
            for fn in _listeners:
                fn()
    env_raw = raw


def parse_env(raw: str) -> dict[str, str]:
    """``"rms_norm=eager, paged_attention=triton"`` or ``"triton"`` (every op) -> mapping."""
    mapping = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        op_name, sep, impl_name = item.partition("=")
        if not sep:
            op_name, impl_name = ALL_OPS, op_name
        mapping[op_name.strip()] = impl_name.strip()
    return mapping


def validate(ops: Mapping, mapping: dict[str, str], source: str) -> dict[str, str]:
    """Every op and implementation named exists (ValueError naming ``source`` otherwise)."""
    for op_name, impl_name in mapping.items():
        if op_name == ALL_OPS:
            if not any(impl_name in op.impl_names() for op in ops.values()):
                raise ValueError(f"{source}: no op has an implementation {impl_name!r}")
            continue
        if op_name not in ops:
            raise ValueError(f"{source}: unknown op {op_name!r}; valid ops: {', '.join(sorted(ops))}")
        try:
            ops[op_name].get_impl(impl_name)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
    return dict(mapping)


def forced(op_name: str, impl_names: list[str], state: State | None) -> str | None:
    """The implementation the overrides force for ``op_name``, or None (automatic)."""
    for mapping in (env_map,) if state is None else (state.use, state.engine, env_map):
        impl = mapping.get(op_name)
        if impl is None and mapping.get(ALL_OPS) in impl_names:
            impl = mapping[ALL_OPS]
        if impl is not None:
            return impl
    return None


def _intern(use: dict[str, str], engine: dict[str, str]) -> State | None:
    if not use and not engine:
        return None
    key = (tuple(sorted(use.items())), tuple(sorted(engine.items())))
    return _INTERNED.setdefault(key, State(use, engine))


@contextlib.contextmanager
def push(layer: str, mapping: dict[str, str]) -> Iterator[None]:
    """Add ``mapping`` to the ``"use"`` or ``"engine"`` layer for the ``with`` block."""
    state = CURRENT.get()
    use = dict(state.use) if state else {}
    engine = dict(state.engine) if state else {}
    (use if layer == "use" else engine).update(mapping)
    token = CURRENT.set(_intern(use, engine))
    try:
        yield
    finally:
        CURRENT.reset(token)
