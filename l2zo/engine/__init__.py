"""The ZO engine: blocks, seeded z, in-place perturbations and the two-point estimator.

Pure functions over tensors; no Lightning, no data code.
"""

from l2zo.engine.blocks import Block, block_depth, block_kind, fingerprint, partition
from l2zo.engine.estimator import Probe, evaluate_loss, probe_with, two_point_estimate, zo_probe
from l2zo.engine.modes import eval_mode
from l2zo.engine.noise_table import NoiseTable
from l2zo.engine.perturb import axpby2_z_, axpby_z_, for_each_z, perturb_
from l2zo.engine.seeding import Z_CHUNK, ZSource, mix_seed

__all__ = [
    "Z_CHUNK",
    "Block",
    "NoiseTable",
    "Probe",
    "ZSource",
    "axpby2_z_",
    "axpby_z_",
    "block_depth",
    "block_kind",
    "eval_mode",
    "evaluate_loss",
    "fingerprint",
    "for_each_z",
    "mix_seed",
    "partition",
    "perturb_",
    "probe_with",
    "two_point_estimate",
    "zo_probe",
]
