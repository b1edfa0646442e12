"""Optimizers: one ``torch.optim.Optimizer`` interface for MeZO, the ZO baselines and the learned optimizer."""

from l2zo.optim.base import Measurement, NonFiniteLossError, ZOOptimizer
from l2zo.optim.hparams import HParams, ZOHParams
from l2zo.optim.methods.mezo import MeZO
from l2zo.optim.registry import OptimizerSpec, build_optimizer, get_optimizer_spec, optimizer_specs

__all__ = [
    "HParams",
    "MeZO",
    "Measurement",
    "NonFiniteLossError",
    "OptimizerSpec",
    "ZOHParams",
    "ZOOptimizer",
    "build_optimizer",
    "get_optimizer_spec",
    "optimizer_specs",
]
