"""Typed run configs, read from YAML and the command line (the command line wins).

Each workflow has one dataclass; its field names are the YAML keys and, with dashes, the flags
(``batch_size`` <-> ``--batch-size``). The field docstrings in ``FIELD_HELP`` become ``--help`` text.
Unknown keys, wrong types and bad choices are user errors that name the key and the valid values.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from l2zo.errors import L2ZOError

PRECISIONS = ("32", "bf16-mixed")
SCHEDULES = ("constant", "linear")


@dataclasses.dataclass
class FinetuneConfig:
    model: str = "tiny"
    task: str = "synth-negation"
    data_dir: str | None = None
    optimizer: str = "mezo"
    lr: float | None = None
    eps: float | None = None
    weight_decay: float | None = None
    opt_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    artifact: str | None = None
    steps: int = 200
    batch_size: int = 16
    eval_every: int = 100
    eval_batch_size: int = 32
    seed: int = 0
    data_seed: int = 0
    num_train: int | None = None
    num_dev: int | None = None
    num_test: int | None = None
    max_length: int = 256
    lr_schedule: str = "constant"
    precision: str = "32"
    cache_z: bool = False
    logdir: str = "runs/finetune"
    save_model: bool = False
    include: list[str] | None = None
    exclude: list[str] | None = None
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("lr_schedule", self.lr_schedule, SCHEDULES)
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        for key in ("steps", "batch_size", "eval_every", "eval_batch_size", "max_length"):
            if getattr(self, key) <= 0:
                raise L2ZOError(f"--{key.replace('_', '-')} must be positive, got {getattr(self, key)}")
        for key in ("num_train", "num_dev", "num_test"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise L2ZOError(f"--{key.replace('_', '-')} must be positive, got {getattr(self, key)}")


FIELD_HELP: dict[str, str] = {
    "model": "model: tiny, tiny-derived, smollm2-135m, a hub id, a local folder or a .gguf file",
    "task": "task name (see `l2zo tasks`) or a path to a user task YAML",
    "data_dir": "local data root laid out like ../shared/data (default: the Hugging Face hub)",
    "optimizer": "optimizer name (see `l2zo optimizers`)",
    "lr": "learning rate (default: the optimizer's published default)",
    "eps": "ZO perturbation radius (default: the optimizer's)",
    "weight_decay": "weight decay on matrices (not biases or norm gains)",
    "opt_args": "other optimizer hyperparameters as key=value[,key=value]",
    "artifact": "learned-optimizer artifact folder (for --optimizer learned)",
    "steps": "optimizer steps",
    "batch_size": "training examples per step",
    "eval_every": "evaluate on dev every N steps",
    "eval_batch_size": "examples per evaluation batch",
    "seed": "training seed: z seeds and batch order",
    "data_seed": "seed of MeZO's train/dev/test sampling",
    "num_train": "training examples sampled (default: the task's; MeZO: 1000)",
    "num_dev": "dev examples (default: the task's; MeZO: 500, 100 for CB/COPA)",
    "num_test": "test examples, at most (default: the task's; MeZO: 1000)",
    "max_length": "max tokens per (prompt, candidate) sequence; prompts are cut on the left",
    "lr_schedule": "constant or linear (decay to 0)",
    "precision": "32 or bf16-mixed (bf16 autocast over fp32 weights; losses in fp32)",
    "cache_z": "ZO optimizers draw z once per step and keep it (one parameter-sized copy); same parameters, "
    "fewer regenerations (see BENCHMARKS.md)",
    "logdir": "run folder: TensorBoard events, config.yaml, summary.json",
    "save_model": "save the fine-tuned model into LOGDIR/model",
    "include": "regexes: train only parameters whose names match",
    "exclude": "regexes: freeze parameters whose names match",
    "device": "auto, cpu or cuda",
    "progress": "show a progress bar",
}

C = TypeVar("C")


def check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise L2ZOError(f"bad --{key.replace('_', '-')} {value!r}; valid choices: {', '.join(choices)}")


def parse_kv(text: str) -> dict[str, Any]:
    """Parse "a=1,b=x" into {"a": 1, "b": "x"}, values read as YAML scalars."""
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise L2ZOError(f"expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = yaml.safe_load(v)
    return out


def _base_type(tp: Any) -> Any:
    """The non-None member of an Optional annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _coerce(key: str, value: Any, tp: Any) -> Any:
    tp = _base_type(tp)
    if value is None:
        return None
    origin = typing.get_origin(tp) or tp
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
        if origin is list:
            items = value.split(",") if isinstance(value, str) else list(value)
            return [str(v) for v in items]
        if origin is dict:
            return parse_kv(value) if isinstance(value, str) else dict(value)
    except (TypeError, ValueError):
        name = getattr(tp, "__name__", str(tp))
        raise L2ZOError(f"bad value for {key}: {value!r} is not a valid {name}") from None
    return value


def build_config(cls: type[C], file: str | Path | None, overrides: dict[str, Any]) -> C:
    """Defaults, then the YAML ``file``, then ``overrides`` (None values in overrides are ignored)."""
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise L2ZOError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise L2ZOError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise L2ZOError(f"config file {path} must be a mapping of keys to values")
        for k, v in loaded.items():
            values[str(k).replace("-", "_")] = v
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise L2ZOError(f"unknown config key {', '.join(map(repr, unknown))}; valid keys: {', '.join(valid)}")
    return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, help_text: dict[str, str]) -> None:
    """One ``--flag`` per dataclass field, all defaulting to None so the YAML file can fill them."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else "{}"
        h = f"{help_text.get(f.name, '')} (default: {default})"
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=h)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=h)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
