"""Compile a C source of this package once per host CPU and load it with ctypes.

The shared library lands in ``$LEPTON_CACHE_DIR`` (default ``$XDG_CACHE_HOME/lepton``, else
``~/.cache/lepton``) under a name that hashes the source, the compiler command and the CPU's
feature flags, so an edited source, another compiler or another machine sharing the home folder
gets its own build. It is written to a temporary name and renamed, so concurrent first uses
never load a half-written file. OpenMP comes from the runtime torch already loaded (same
soname), so the kernels share torch's threads instead of starting a second pool.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent


def cache_dir() -> Path:
    root = os.environ.get("LEPTON_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lepton"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _command(compiler: str) -> list[str]:
    flags = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11"]
    if platform.machine() in ("x86_64", "AMD64"):
        # gcc prefers 256-bit vectors even where AVX-512 exists; the kernels use 16 lanes there.
        flags.append("-mprefer-vector-width=512")
    return [compiler, *flags]


@functools.lru_cache(maxsize=None)
def load(source: str) -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None), or (None, why not) when there is no compiler or the build fails."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None, f"no C compiler ({os.environ.get('CC', 'cc')}) on PATH to build {source}"
    src = HERE / source
    command = _command(compiler)
    # The headers beside it are part of the build (the sources are one translation unit).
    headers = b"".join(h.read_bytes() for h in sorted(HERE.glob("*.h")))
    key = hashlib.sha256(src.read_bytes() + headers + " ".join(command).encode() + _cpu_flags().encode())
    target = cache_dir() / "cpu_kernels" / f"{src.stem}-{key.hexdigest()[:16]}.so"
    if not target.is_file():
        why = _compile(command, src, target)
        if why is not None:
            return None, why
    try:
        return ctypes.CDLL(str(target)), None
    except OSError as err:
        return None, f"{target.name} failed to load: {err}"


def _compile(command: list[str], src: Path, target: Path) -> str | None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
    except OSError as err:
        return f"cannot write the kernel cache ({err}); set LEPTON_CACHE_DIR"
    try:
        done = subprocess.run([*command, str(src), "-o", tmp], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            return f"{src.name} failed to compile: {done.stderr.strip().splitlines()[-1:]}"
        os.replace(tmp, target)
        logger.info("built %s", target)
        return None
    except (OSError, subprocess.SubprocessError) as err:
        return f"{src.name} failed to compile: {err}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
