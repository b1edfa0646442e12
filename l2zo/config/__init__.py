"""Typed run configs: dataclasses whose fields are the YAML keys and the flags (served by jsonargparse).

``DataArgs`` (model and data), ``DistributedArgs`` (devices and nodes), ``PeftArgs`` (an adapter) and ``ZArgs``
(how z is drawn) are nested
configs shared by finetune, compare and meta-train; each field's docstring is its ``--help`` text.
``l2zo.config.parser`` turns a dataclass into a command line.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from l2zo.config.checks import PRECISIONS, SCHEDULES, Device, Precision, Schedule, check_choice, check_fields
from l2zo.config.data import DataArgs
from l2zo.config.distributed import DistributedArgs
from l2zo.config.finetune import FinetuneConfig
from l2zo.config.peft import PEFT_KEYS, PEFT_SCHEMES, PeftArgs
from l2zo.config.values import parse_kv, parse_pair, parse_scalar, read_yaml_mapping, split_list
from l2zo.config.zsource import ZArgs


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-able data that its command's ``--config`` reads back (nested configs nested;
    the fields the command leaves out, ``cli_skip``, left out here too)."""
    out = dataclasses.asdict(cfg)
    for key in getattr(type(cfg), "cli_skip", ()):
        *groups, leaf = key.split(".")
        node = out
        for group in groups:
            node = node[group]
        del node[leaf]
    return out


__all__ = [
    "PRECISIONS",
    "SCHEDULES",
    "DataArgs",
    "DistributedArgs",
    "Device",
    "FinetuneConfig",
    "PEFT_KEYS",
    "PEFT_SCHEMES",
    "PeftArgs",
    "ZArgs",
    "Precision",
    "Schedule",
    "check_choice",
    "check_fields",
    "config_to_dict",
    "parse_kv",
    "parse_pair",
    "parse_scalar",
    "read_yaml_mapping",
    "split_list",
]
