"""Optimizers: one ``torch.optim.Optimizer`` interface for MeZO, the ZO baselines and the learned optimizer."""

from l2zo.optim.base import NonFiniteLossError, ZOOptimizer, eval_mode
from l2zo.optim.methods.mezo import MeZO
from l2zo.optim.registry import OptimizerSpec, build_optimizer, get_optimizer_spec, optimizer_specs

__all__ = [
    "MeZO",
    "NonFiniteLossError",
    "OptimizerSpec",
    "ZOOptimizer",
    "build_optimizer",
    "eval_mode",
    "get_optimizer_spec",
    "optimizer_specs",
]
