"""Builds the optional native extension lepton_kernels._C from csrc/ (pybind11, no torch headers).

Everything else is declared in pyproject.toml. The extension is skipped when csrc/ holds no
sources or when LEPTON_NO_EXT=1; the package imports and works without it.
"""

import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))


def ext_modules():
    if os.environ.get("LEPTON_NO_EXT") == "1" or not SOURCES:
        return []
    from pybind11.setup_helpers import Pybind11Extension

    return [Pybind11Extension("lepton_kernels._C", SOURCES, cxx_std=17)]


setup(ext_modules=ext_modules())
