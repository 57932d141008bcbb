"""CPU implementations of ops that plain PyTorch runs slowly on a CPU.

Each module is one op's ``cpu`` implementation, registered in that op's file in
:mod:`lepton_kernels.ops` and chosen automatically for CPU tensors. Native code is small C
compiled on first use with the system C compiler (``cc``, or ``$CC``) for the host CPU and
loaded with ctypes: no torch headers, nothing to build at install time. Without a compiler the
implementation reports itself unavailable and the registry falls back to the eager spec.
"""
