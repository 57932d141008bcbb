"""Builds the optional native extension lepton_kernels._C from csrc/ (pybind11, no torch headers).

Everything else is declared in pyproject.toml. The package imports and works without the extension.

Environment:
    LEPTON_NO_EXT=1        build no extension at all
    LEPTON_CUDA=0          C++ (cpu) only
    LEPTON_CUDA=1          require the CUDA kernels (fail when nvcc is missing or fails)
    LEPTON_CUDA unset      CUDA kernels when nvcc is found (CUDA_HOME, PATH, /usr/local/cuda);
                           a failing nvcc then falls back to cpu only, with the reason recorded
    LEPTON_CUDA_ARCHS      compute capabilities, default "80;90+PTX": SASS for sm_80 and sm_90 plus
                           PTX of compute_90 for newer GPUs ("+PTX" adds PTX for that entry)
    CUDAHOSTCXX            host compiler for nvcc (nvcc's default otherwise)

The .cu sources are compiled once by nvcc in a build_ext step and linked into the module with
the static CUDA runtime, so the module imports on machines without a CUDA runtime or driver.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"
CPP_SOURCES = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))
CU_SOURCES = sorted(CSRC.glob("*.cu"))
DEFAULT_ARCHS = "80;90+PTX"


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def parse_archs(spec: str) -> list[tuple[str, bool]]:
    """'80;90+PTX' or '8.0 9.0a' -> [('80', False), ('90', True)]: (arch, with PTX)."""
    archs = []
    for item in filter(None, re.split(r"[;,\s]+", spec)):
        match = re.fullmatch(r"(?:sm_|compute_)?(\d+)\.?(\d*[af]?)(\+ptx)?", item.strip(), re.IGNORECASE)
        if not match:
            raise ValueError(f"LEPTON_CUDA_ARCHS: cannot parse {item!r} (expected e.g. '80;90+PTX')")
        archs.append((match.group(1) + match.group(2), match.group(3) is not None))
    if not archs:
        raise ValueError("LEPTON_CUDA_ARCHS is empty")
    return archs


class CudaToolkit:
    """nvcc and what it reports: version, supported archs, the directory of libcudart_static."""

    def __init__(self, nvcc: str):
        self.nvcc = nvcc
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
        found = re.search(r"release (\d+\.\d+)", version)
        self.version = found.group(1) if found else "unknown"
        listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True)
        self.known_archs = set(re.findall(r"compute_(\d+)", listed.stdout)) if listed.returncode == 0 else None
        self.lib_dir = self._lib_dir()

    def _lib_dir(self) -> str:
        # nvcc's dry run names its own library directories, even behind wrapper scripts.
        dry = subprocess.run([self.nvcc, "--dryrun", "-c", "x.cu", "-o", "x.o"], capture_output=True, text=True)
        candidates = re.findall(r'-L"?([^"\s]+)', dry.stdout + dry.stderr)
        top = re.search(r"TOP=(\S+)", dry.stdout + dry.stderr)
        if top:
            candidates += [f"{top.group(1)}/lib64", f"{top.group(1)}/lib/x64"]
        candidates.append(str(Path(self.nvcc).resolve().parent.parent / "lib64"))
        for lib in candidates:
            if not lib.endswith("stubs") and any(Path(lib).glob("*cudart_static*")):
                return os.path.normpath(lib)
        raise RuntimeError(f"cannot find the static CUDA runtime (libcudart_static) next to {self.nvcc}")

    def gencode(self, archs: list[tuple[str, bool]]) -> tuple[list[str], list[str]]:
        """nvcc -gencode flags and the names of what they embed (sm_XX, compute_XX)."""
        flags, names = [], []
        for arch, ptx in archs:
            number = re.match(r"\d+", arch).group()  # 90a (arch-specific features) needs nvcc's 90
            if self.known_archs is not None and number not in self.known_archs:
                known = ", ".join(sorted(self.known_archs, key=lambda a: int(re.match(r"\d+", a).group())))
                raise RuntimeError(f"nvcc {self.version} cannot build sm_{arch} (it knows {known}); "
                                   "set LEPTON_CUDA_ARCHS")
            codes = [f"sm_{arch}"] + ([f"compute_{arch}"] if ptx else [])
            flags += ["-gencode", f"arch=compute_{arch},code=[{','.join(codes)}]"]
            names += codes
        return flags, names


def c_string(text: str) -> str:
    """A C string literal for a -D macro value."""
    return '"' + re.sub(r'["\\\n]', " ", text) + '"'


class BuildExt(build_ext):
    """build_ext that first compiles csrc/*.cu with nvcc and links the objects in."""

    def build_extension(self, ext):
        if ext.name == "lepton_kernels._C":
            self._add_cuda(ext)
        super().build_extension(ext)

    def _add_cuda(self, ext) -> None:
        mode = os.environ.get("LEPTON_CUDA", "auto").strip().lower()
        why_not = None
        if mode in ("0", "off", "false", "no"):
            why_not = "LEPTON_CUDA=0 at build time"
        elif not CU_SOURCES:
            why_not = "no .cu sources in csrc/"
        elif find_nvcc() is None:
            why_not = "nvcc not found at build time (set CUDA_HOME or put nvcc on PATH)"
            if mode == "1":
                raise RuntimeError(f"LEPTON_CUDA=1 but {why_not}")
        if why_not is None:
            try:
                self._compile_cuda(ext, CudaToolkit(find_nvcc()))
                return
            except (RuntimeError, ValueError, OSError, subprocess.CalledProcessError) as err:
                if mode == "1":
                    raise
                why_not = f"the CUDA build failed: {err}"
                print(f"lepton: building lepton_kernels._C without CUDA: {why_not}", file=sys.stderr)
        ext.define_macros.append(("LEPTON_CUDA_WHY_NOT", c_string(why_not)))

    def _compile_cuda(self, ext, cuda: CudaToolkit) -> None:
        gencode, names = cuda.gencode(parse_archs(os.environ.get("LEPTON_CUDA_ARCHS", DEFAULT_ARCHS)))
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        headers = list(CSRC.glob("*.h"))
        stamp = out_dir / "gencode.txt"
        rebuild_all = not stamp.is_file() or stamp.read_text() != " ".join(gencode)
        objects = []
        for source in CU_SOURCES:
            obj = out_dir / (source.stem + ".o")
            newest_input = max(p.stat().st_mtime for p in [source, *headers])
            if self.force or rebuild_all or not obj.is_file() or obj.stat().st_mtime < newest_input:
                cmd = [cuda.nvcc, "-c", str(source), "-o", str(obj), "-O3", "-std=c++17", f"-I{CSRC}",
                       "-Xcompiler", "-fPIC,-fvisibility=hidden", *gencode]
                if os.environ.get("CUDAHOSTCXX"):
                    cmd += ["-ccbin", os.environ["CUDAHOSTCXX"]]
                print(" ".join(cmd))
                subprocess.run(cmd, check=True)
            objects.append(str(obj))
        stamp.write_text(" ".join(gencode))
        ext.extra_objects += objects
        ext.depends += objects  # relink when only the CUDA side changed
        ext.library_dirs.append(cuda.lib_dir)
        ext.libraries += ["cudart_static"] + (["dl", "rt", "pthread"] if sys.platform.startswith("linux") else [])
        if sys.platform.startswith("linux"):
            # Keep the static runtime's symbols private: torch may load its own libcudart.
            ext.extra_link_args.append("-Wl,--exclude-libs,ALL")
        ext.define_macros += [("LEPTON_WITH_CUDA", "1"),
                              ("LEPTON_CUDA_ARCHS", c_string(";".join(names))),
                              ("LEPTON_CUDA_VERSION", c_string(cuda.version))]


def ext_modules():
    if os.environ.get("LEPTON_NO_EXT") == "1" or not CPP_SOURCES:
        return []
    from pybind11.setup_helpers import ParallelCompile, Pybind11Extension

    ParallelCompile("LEPTON_BUILD_JOBS").install()  # the C++ sources in parallel (default: all cores)

    extra = [] if sys.platform == "win32" else ["-O3"]
    return [Pybind11Extension("lepton_kernels._C", CPP_SOURCES, cxx_std=17, extra_compile_args=extra,
                              depends=[str(p.relative_to(ROOT)) for p in [*CSRC.glob("*.h"), *CU_SOURCES]])]


setup(ext_modules=ext_modules(), cmdclass={"build_ext": BuildExt})
