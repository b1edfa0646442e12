"""``apply_z_args``: the options of ``ZArgs`` (--z-source, --z-table-size, --cache-z, --two-pass) set on an optimizer,
the one place finetune, compare and bench do it."""

from __future__ import annotations

import torch

from l2zo.config.zsource import ZArgs
from l2zo.optim.base import ZOOptimizer


def apply_z_args(opt: torch.optim.Optimizer, zo: ZArgs) -> list[str]:
    """Set ``zo`` on ``opt`` in place; returns what it ignored and why (an empty list when nothing was): options for
    an optimizer that draws no z (first-order ones), or --two-pass for a method whose step is not MeZO's."""
    if zo == ZArgs():
        return []
    if not isinstance(opt, ZOOptimizer):
        return [f"--z-source/--cache-z/--two-pass ignored: {type(opt).__name__} does not draw z"]
    opt.set_z_source(zsrc=zo.make_source())
    if zo.two_pass and not opt.set_two_pass(True):
        return [f"--two-pass ignored: {type(opt).__name__}'s step is not MeZO's along a sigma known ahead"]
    return []
