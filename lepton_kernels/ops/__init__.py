"""One module per op. Each registers its eager spec (and accelerated implementations) on import.

Modules are discovered rather than listed, so contributing an op is adding one file here.
Modules whose name starts with an underscore are helpers (e.g. kernels loaded lazily) and are
not imported here.
"""

import importlib
import pkgutil


def _load_all() -> None:
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_load_all()
