"""Building lepton_kernels._C: with CUDA (when nvcc exists, the device code is really compiled for
sm_80 and sm_90 plus PTX, even on a machine without a GPU), without CUDA, and not at all."""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def find_nvcc():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def build(tmp_path: Path, **env) -> Path:
    """`setup.py build_ext` into tmp_path (the checkout's own build is left alone); the .so path."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LEPTON_")}
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                           "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, env={**environ, **env},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (so,) = (tmp_path / "lib" / "lepton_kernels").glob("_C*")
    return so


# Loads the built module under its real name in a fresh interpreter (the package's own _C untouched)
# and runs one cpu reshape_and_cache through it.
PROBE = """
import importlib.machinery, importlib.util, json, sys, torch
loader = importlib.machinery.ExtensionFileLoader("lepton_kernels._C", sys.argv[1])
mod = importlib.util.module_from_spec(importlib.util.spec_from_loader("lepton_kernels._C", loader))
loader.exec_module(mod)
k = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
k_cache, v_cache = torch.zeros(2, 2, 3, 4), torch.zeros(2, 2, 3, 4)
mod.reshape_and_cache(k, k + 1, k_cache, v_cache, torch.tensor([3, -1]))
ok = torch.equal(k_cache[1, 1], k[0]) and torch.equal(v_cache[1, 1], k[0] + 1) and k_cache.sum() == k[0].sum()
print(json.dumps({**mod.build_info(), "has_cuda": mod.has_cuda(), "cpu_ok": bool(ok)}))
"""


def probe(so: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, str(so)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def elf_section(path: Path, wanted: str) -> bytes | None:
    """The bytes of one section of a 64-bit little-endian ELF file, None if it has none."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "expected a 64-bit little-endian ELF"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]
    for name_off, _, _, _, offset, size in headers:
        name = data[names_at + name_off:data.index(b"\0", names_at + name_off)].decode()
        if name == wanted:
            return data[offset:offset + size]
    return None


def fatbin_entries(blob: bytes) -> set[str]:
    """What nvcc embedded: 'sm_XX' for SASS (cubin) entries, 'compute_XX' for PTX entries.
    Layout: fatbin header (magic 0xBA55ED50, version u16, header size u16, payload size u64), then
    entries (kind u16: 1 PTX, 2 cubin; version u16; header size u32; payload size u64; ...;
    target arch u32 at offset 28)."""
    found, pos = set(), 0
    while pos + 16 <= len(blob):
        magic, _, header, size = struct.unpack_from("<IHHQ", blob, pos)
        if magic != 0xBA55ED50:
            break
        entry, end = pos + header, pos + header + size
        while entry < end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", blob, entry)
            arch, = struct.unpack_from("<I", blob, entry + 28)
            found.add(f"{'compute' if kind == 1 else 'sm'}_{arch}")
            entry += entry_header + payload
        pos = end
    return found


def exported_symbols(so: Path) -> list[str]:
    out = subprocess.run(["nm", "-D", "--defined-only", str(so)], capture_output=True, text=True, check=True)
    return [line.split()[-1] for line in out.stdout.splitlines() if line.strip()]


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found: the CUDA half cannot be built on this machine")
def test_cuda_build_compiles_device_code_for_sm80_sm90_and_ptx(tmp_path):
    so = build(tmp_path, LEPTON_CUDA="1")
    info = probe(so)
    assert info["has_cuda"] and info["cuda"] and info["cpu_ok"], info
    assert info["cuda_archs"].split(";") == ["sm_80", "sm_90", "compute_90"]
    fatbin = elf_section(so, ".nv_fatbin")
    assert fatbin is not None, "no device code in the module"
    assert fatbin_entries(fatbin) == {"sm_80", "sm_90", "compute_90"}
    symbols = exported_symbols(so)
    assert "PyInit__C" in symbols
    # The static CUDA runtime stays private (torch may load its own) and is not a load-time need.
    assert not [s for s in symbols if s.startswith("cuda")], "CUDA runtime symbols are exported"
    needed = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True).stdout
    assert "libcudart" not in needed and "libcuda." not in needed


def test_cpu_only_build_imports_and_says_why(tmp_path):
    so = build(tmp_path, LEPTON_CUDA="0")
    info = probe(so)
    assert not info["has_cuda"] and not info["cuda"] and info["cpu_ok"], info
    assert "LEPTON_CUDA=0" in info["cuda_why_not"]
    assert elf_section(so, ".nv_fatbin") is None


def test_no_ext_builds_nothing_and_the_package_still_works(tmp_path):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LEPTON_")}
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                           "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, env={**environ, "LEPTON_NO_EXT": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(tmp_path.glob("lib/lepton_kernels/_C*"))
    code = ("import torch, lepton_kernels as lk; i = lk.ext_info(); assert not i['built'], i; "
            "op = lk.get_op('reshape_and_cache'); s = op.sample_inputs('cpu', torch.float32)[0]; "
            "assert op.select(*s.args) == 'eager'; op(*s.args); print(lk.describe())")
    out = subprocess.run([sys.executable, "-c", code], env={**environ, "LEPTON_NO_EXT": "1"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "lepton_kernels._C: not available: disabled by LEPTON_NO_EXT=1" in out.stdout
    assert any(line.startswith("reshape_and_cache  ext") and " no " in line for line in out.stdout.splitlines())
