"""Module modes around ZO forwards: dropout off, then every submodule's own mode back.

Here, in the engine, so that both the optimizers (``l2zo.optim``) and the meta-objectives
(``l2zo.learned``) use it without importing each other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(module: nn.Module | None) -> Iterator[None]:
    """Dropout off for the ZO forwards (both must see the same function), then each submodule's mode back."""
    if module is None:
        yield
        return
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
