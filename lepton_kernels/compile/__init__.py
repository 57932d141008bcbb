"""Ahead-of-time compile report of every Triton kernel, for real NVIDIA targets, without a GPU.

    lepton kernels --compile [--arch sm_80,sm_90] [--json] [--check]
    python -m lepton_kernels.compile ...                  (the same flags)

Every launch path of every kernel (cases.py) is compiled to a cubin with Triton's bundled ptxas
against a fake device (driver.py); the report (report.py) gives registers, spills, shared memory
and tensor-core instruction counts per (kernel, config, arch), and ``--check`` fails on compile
errors, spills, shared memory over the limit, or matmul-class kernels without tensor cores.
Importing this package imports neither torch nor triton; running the report imports both.
"""

from .cli import add_arguments, main, run_command

__all__ = ["add_arguments", "main", "run_command"]
