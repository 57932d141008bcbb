"""Engine tests: loader, generation against transformers, the Engine API and its bad inputs.

``checkpoint(tmp_path_factory, arch, **overrides)`` builds a tiny checkpoint with the factory of
tests/models/conftest.py once per session and arch/overrides, shared by every engine test module.
"""

from __future__ import annotations

import json
from pathlib import Path

_CACHE: dict[str, Path] = {}


def checkpoint(tmp_path_factory, arch: str, **overrides) -> Path:
    from tests.models.conftest import make_checkpoint

    key = arch + json.dumps(overrides, sort_keys=True, default=str)
    if key not in _CACHE:
        _CACHE[key] = make_checkpoint(tmp_path_factory.mktemp("engine_ckpt"), arch, **overrides)
    return _CACHE[key]
