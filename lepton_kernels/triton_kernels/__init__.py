"""Triton kernels, one module per op, imported lazily: each op file's
``load_triton()`` imports its launcher on the first call that selects it (see backends.py).

Every module here imports triton; nothing outside this package does.
"""
