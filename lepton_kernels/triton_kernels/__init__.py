"""Triton kernels, one module per op, imported lazily by the registry (see ops/_backends.py).

Every module here imports triton; nothing outside this package does.
"""
