"""Imports every module in ``l2zo.optim.methods`` so that each registers its optimizers."""

from __future__ import annotations

import importlib
import pkgutil

import l2zo.optim.methods as _methods

for _info in sorted(pkgutil.iter_modules(_methods.__path__), key=lambda m: m.name):
    importlib.import_module(f"{_methods.__name__}.{_info.name}")
