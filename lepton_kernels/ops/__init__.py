"""One module per op: its math in the docstring, the eager spec (registered with
``@register_op``), sample inputs, and the registrations of its accelerated implementations.

lepton_kernels/__init__.py imports every op module by name (an editor can follow it); a new op
file adds its line there, and tests/test_registry.py checks that none is missing.
"""
