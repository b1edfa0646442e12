"""Per-block statistics of a model state and what they predict about a per-block ZO allocation (issue 15, item 1).

``stats``: G_b, the minibatch noise, tau_b = tr(H_bb) and E[g^T H_bb g] from two batches and HVPs.
``gain``: the one-step expected change, R(s) against MeZO, and the K-step closed form of the block quadratic.
``oracles``: water-filling at fixed eta, tempered Gauss-Southwell-Lipschitz, tempered inverse curvature.
Pure functions over tensors: no Lightning, no data code.
"""

from l2zo.blockstats.gain import (
    KStep,
    QuadraticModel,
    StepTerms,
    gain_ratio,
    kstep,
    kstep_loss,
    normalize,
    positive_curvature,
    step_terms,
    terms_of_w,
    transition,
    tune_eta,
)
from l2zo.blockstats.oracles import gsl, hizoo, project_simplex, water_filling
from l2zo.blockstats.stats import BatchFns, BlockStats, PairSample, combine, measure_block_stats, measure_pair

__all__ = [
    "BatchFns",
    "BlockStats",
    "KStep",
    "PairSample",
    "QuadraticModel",
    "StepTerms",
    "combine",
    "gain_ratio",
    "gsl",
    "hizoo",
    "kstep",
    "kstep_loss",
    "measure_block_stats",
    "measure_pair",
    "normalize",
    "positive_curvature",
    "project_simplex",
    "step_terms",
    "terms_of_w",
    "transition",
    "tune_eta",
    "water_filling",
]
