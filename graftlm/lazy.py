"""Names a package exports but imports only when first used (PEP 562), so that reading
one light module of it (a config section, a row reader) does not import torch or numpy
through the package's others: what keeps `graft --help` quick."""

from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, defined_in: dict[str, str]):
    """A module `__getattr__` for `package` that imports each name of `defined_in` (name ->
    its submodule) on first use and keeps it on the package, as a plain import would."""

    def __getattr__(name: str):
        if name not in defined_in:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{defined_in[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
