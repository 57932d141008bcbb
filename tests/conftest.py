import os

# Triton decides interpreter vs compiler when @triton.jit runs, i.e. at import of a kernel module:
# this must happen before anything imports lepton_kernels' triton kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("LEPTON_KERNELS", None)
