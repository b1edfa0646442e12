"""``DataArgs``: the model and the data of a run, one nested config shared by finetune, compare and meta-train."""

from __future__ import annotations

import dataclasses
from typing import Literal

from l2zo.config.checks import Device, Precision, check_fields


@dataclasses.dataclass
class DataArgs:
    """Model and data (flags --model ... or --data.model ...; YAML keys at the top or under data:)"""

    model: str = "tiny"
    """model: tiny, tiny-derived, smollm2-135m, a hub id, a local folder or a .gguf file"""
    task: str = "synth-negation"
    """task name (see `l2zo tasks`) or a path to a user task YAML"""
    data_dir: str | None = None
    """local data root laid out like ../shared/data (default: the Hugging Face hub)"""
    data_seed: int = 0
    """seed of MeZO's train/dev/test sampling (the same for every run of a compare)"""
    num_train: int | None = None
    """training examples sampled (default: the task's; MeZO: 1000)"""
    num_dev: int | None = None
    """dev examples (default: the task's; MeZO: 500, 100 for CB/COPA)"""
    num_test: int | None = None
    """test examples, at most (default: the task's; MeZO: 1000)"""
    max_length: int = 256
    """max tokens per (prompt, candidate) sequence; prompts are cut on the left"""
    batch_size: int = 16
    """training examples per step"""
    eval_batch_size: int = 32
    """examples per evaluation batch"""
    precision: Precision = "32"
    """32, or bf16-mixed: bf16 autocast over fp32 weights, losses in fp32"""
    device: Device = "auto"
    """auto, cpu or cuda"""
    device_map: Literal["auto"] | None = None
    """auto: spread the model's layers over this machine's GPUs (as MeZO); refused if a layer would be offloaded"""

    def __post_init__(self) -> None:
        check_fields(self, positive=("num_train", "num_dev", "num_test", "max_length", "batch_size", "eval_batch_size"))
