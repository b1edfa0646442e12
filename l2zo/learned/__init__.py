"""The learned part of l2zo: per-block features, the variance net, sigma normalisation and artifacts.

The optimizer that uses them is ``l2zo.optim.methods.learned.LearnedZO`` (registered as "learned",
with the ablations "learned-random" and "per-block-const").
"""

from l2zo.learned.artifact import (
    FORMAT_VERSION,
    ArtifactWarning,
    LoadedArtifact,
    architecture_record,
    evaluate_sigma,
    load_artifact,
    read_artifact,
    read_manifest,
    save_artifact,
)
from l2zo.learned.features import FEATURE_NAMES, FeatureRef, FeatureSpec, build_features, weight_stats
from l2zo.learned.net import NetSpec, VarianceNet
from l2zo.learned.normalization import NORMALIZATION_RULES, block_weights, normalize_sigma

__all__ = [
    "FEATURE_NAMES",
    "FORMAT_VERSION",
    "NORMALIZATION_RULES",
    "ArtifactWarning",
    "FeatureRef",
    "FeatureSpec",
    "LoadedArtifact",
    "NetSpec",
    "VarianceNet",
    "architecture_record",
    "block_weights",
    "build_features",
    "evaluate_sigma",
    "load_artifact",
    "normalize_sigma",
    "read_artifact",
    "read_manifest",
    "save_artifact",
    "weight_stats",
]
