"""What ``l2zo compare`` runs: the compare config, the optimizer list, per-run hyperparameters, sweeps.

``--optimizers`` is a comma-separated list of items ``NAME[=ARTIFACT][:key=value[:key=value...]]``:
``mezo``, ``learned=DIR`` (the learned optimizer with an artifact folder), ``mezo:lr=1e-4:eps=1e-3``.
A bare ``key=value`` item (its key not an optimizer) continues the previous item, so
``mezo:lr=1e-4,eps=1e-3`` means the same as the colon form. ``--opt-config FILE`` maps an optimizer
name (or a run label) to ``{key: value}``; items on the list win over the file. The same optimizer may
appear more than once; its runs are then labelled by what differs (``mezo@lr=1e-05``).

Everything here is checked before any run starts: a mistake is one ``L2ZOError`` line.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path
from typing import Any

import yaml

from l2zo.config import PRECISIONS, SCHEDULES, check_choice
from l2zo.errors import L2ZOError


@dataclasses.dataclass
class CompareConfig:
    """The keys of ``l2zo compare`` (flags, or the same keys in ``--config FILE``)."""

    model: str = "tiny"
    task: str = "synth-sentiment"
    data_dir: str | None = None
    optimizers: str | list[str] = "mezo"
    opt_config: str | dict[str, Any] | None = None
    steps: int = 200
    seeds: str | list[int] | int = "0"
    logdir: str = "runs/compare"
    sweep: str | dict[str, Any] | None = None
    select: str = "final"
    batch_size: int = 16
    eval_every: int = 100
    eval_batch_size: int = 32
    data_seed: int = 0
    num_train: int = 1000
    num_dev: int | None = None
    num_test: int = 1000
    max_length: int = 256
    lr_schedule: str = "constant"
    precision: str = "32"
    cache_z: bool = False
    device: str = "auto"
    progress: bool = False

    def __post_init__(self) -> None:
        check_choice("select", self.select, ("final", "best"))
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("lr_schedule", self.lr_schedule, SCHEDULES)
        if isinstance(self.optimizers, list):  # YAML list form
            self.optimizers = ",".join(str(x) for x in self.optimizers)


COMPARE_HELP: dict[str, str] = {
    "model": "model for every run (tiny, a hub id, a folder ...)",
    "task": "task for every run (see `l2zo tasks`)",
    "data_dir": "local data root (default: the Hugging Face hub)",
    "optimizers": "comma list: NAME, learned=DIR, NAME:key=value[:key=value] (a name may repeat)",
    "opt_config": "YAML file: optimizer (or run label) -> {key: value}",
    "steps": "optimizer steps per run",
    "seeds": "run seeds, e.g. 0,1,2 (batch order and z); every optimizer gets each seed",
    "logdir": "experiment folder: runs go to LOGDIR/<run>/seed<k>/, tables and plots to LOGDIR",
    "sweep": "KEY=v1,v2,... (e.g. lr=1e-7,1e-6,1e-5; several keys: 'lr=..;eps=..'): run each point, pick on dev",
    "select": "sweep selection: 'final' or 'best' dev loss (mean over seeds); never test",
    "batch_size": "training examples per step",
    "eval_every": "evaluate on dev every N steps (resolution of the dev curves)",
    "eval_batch_size": "examples per evaluation batch",
    "data_seed": "seed of the train/dev/test sampling (the same for every run)",
    "num_train": "training examples sampled",
    "num_dev": "dev examples (default: the task's)",
    "num_test": "test examples, at most",
    "max_length": "max tokens per (prompt, candidate) sequence",
    "lr_schedule": "constant or linear",
    "precision": "32 or bf16-mixed",
    "cache_z": "ZO runs draw z once per step into one parameter-sized copy (same parameters, faster on few cores)",
    "device": "auto, cpu or cuda",
    "progress": "show a progress bar per run",
}


@dataclasses.dataclass
class RunSpec:
    """One optimizer configuration to run at every seed.

    Attributes:
        label: unique name; also the run folder under LOGDIR (sweep points add a sub-folder).
        optimizer: the registry name.
        hparams: hyperparameters given by the user (file and list), over the optimizer's defaults.
        base: the label before a sweep point was applied (== label without a sweep).
        sweep: the sweep point, e.g. {"lr": 1e-6}; empty without a sweep.
    """

    label: str
    optimizer: str
    hparams: dict[str, Any] = dataclasses.field(default_factory=dict)
    base: str = ""
    sweep: dict[str, Any] = dataclasses.field(default_factory=dict)


def parse_scalar(text: str) -> Any:
    """'1e-4' -> 1e-4 (PyYAML reads it as a string), '3' -> 3, 'true' -> True, 'x' -> 'x'."""
    text = text.strip()
    for cast in (int, float):
        try:
            value = cast(text)
        except ValueError:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            break
        return value
    value = yaml.safe_load(text) if text else ""
    return text if isinstance(value, (dict, list)) or value is None else value


def fmt_value(value: Any) -> str:
    """A short, stable text for a hyperparameter value (labels, folder names, tables)."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(fmt_value(v) for v in value) + ")"
    return str(value)


def fmt_hparams(hp: dict[str, Any]) -> str:
    return " ".join(f"{k}={fmt_value(v)}" for k, v in sorted(hp.items()))


def parse_seeds(value: str | list[int] | int) -> list[int]:
    items = value if isinstance(value, list) else str(value).split(",")
    try:
        seeds = [int(str(s).strip()) for s in items if str(s).strip()]
    except ValueError:
        raise L2ZOError(f"bad --seeds {value!r}: expected integers like 0,1,2") from None
    if not seeds:
        raise L2ZOError("--seeds is empty: give at least one seed, e.g. --seeds 0")
    if len(set(seeds)) != len(seeds):
        raise L2ZOError(f"--seeds repeats a seed: {value!r}")
    return seeds


def parse_sweep(value: str | dict[str, Any] | None) -> list[dict[str, Any]]:
    """'lr=1e-7,1e-6' -> [{'lr': 1e-7}, {'lr': 1e-6}]; several keys ('lr=..;eps=..') give their grid."""
    if value is None or value == "":
        return []
    if isinstance(value, dict):
        axes = {str(k): v if isinstance(v, list) else [v] for k, v in value.items()}
        axes = {k: [parse_scalar(str(x)) for x in vs] for k, vs in axes.items()}
    else:
        axes = {}
        for part in filter(None, (p.strip() for p in value.split(";"))):
            if "=" not in part:
                raise L2ZOError(f"bad --sweep {value!r}: expected KEY=v1,v2,... (e.g. lr=1e-7,1e-6,1e-5)")
            key, values = part.split("=", 1)
            axes[key.strip().replace("-", "_")] = [parse_scalar(v) for v in values.split(",") if v.strip()]
    for key, values in axes.items():
        if not values:
            raise L2ZOError(f"bad --sweep: no values for {key!r}")
        if len(set(map(fmt_value, values))) != len(values):
            raise L2ZOError(f"bad --sweep: {key!r} repeats a value")
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def load_opt_config(value: str | dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The ``--opt-config`` mapping (a file name, or the mapping itself from ``--config``)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        data: Any = value
    else:
        path = Path(value)
        if not path.is_file():
            raise L2ZOError(f"--opt-config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise L2ZOError(f"--opt-config {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) or v is None for v in data.values()):
        raise L2ZOError("--opt-config must map optimizer names to {key: value} mappings, e.g. 'mezo: {lr: 1e-4}'")
    # YAML 1.1 reads 1e-4 as a string; re-read scalars the way the command line does.
    return {str(k): {str(kk).replace("-", "_"): parse_scalar(vv) if isinstance(vv, str) else vv
                     for kk, vv in (v or {}).items()} for k, v in data.items()}  # fmt: skip


def _parse_item(item: str) -> tuple[str, dict[str, Any]]:
    """'mezo:lr=1e-4:eps=1e-3' -> ('mezo', {...}); 'learned=DIR' -> ('learned', {'artifact': 'DIR'})."""
    name, *pairs = item.split(":")
    hp: dict[str, Any] = {}
    if "=" in name:
        name, artifact = name.split("=", 1)
        hp["artifact"] = artifact.strip()
    for pair in pairs:
        if "=" not in pair:
            raise L2ZOError(f"bad --optimizers item {item!r}: expected NAME:key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        hp[key.strip().replace("-", "_")] = parse_scalar(value)
    return name.strip(), hp


def parse_optimizers(text: str, known: list[str], opt_config: dict[str, dict[str, Any]]) -> list[RunSpec]:
    """Split the ``--optimizers`` list into labelled ``RunSpec`` (hyperparameters not yet validated)."""
    items: list[tuple[str, dict[str, Any]]] = []
    for raw in filter(None, (s.strip() for s in text.split(","))):
        head = raw.split(":")[0].split("=")[0].strip()
        if "=" in raw and ":" not in raw and head not in known:
            if not items:  # a continuation with nothing to continue
                raise L2ZOError(f"bad --optimizers item {raw!r}: expected an optimizer name first")
            key, value = raw.split("=", 1)
            items[-1][1][key.strip().replace("-", "_")] = parse_scalar(value)
            continue
        items.append(_parse_item(raw))
    if not items:
        raise L2ZOError("--optimizers is empty: name at least one, e.g. --optimizers mezo,zo-adam")
    for name, _ in items:
        if name not in known:
            raise L2ZOError(f"unknown optimizer {name!r} in --optimizers; valid choices: {', '.join(sorted(known))}")
    unknown_keys = sorted(set(opt_config) - set(known) - {n for n, _ in items})
    if unknown_keys:
        raise L2ZOError(f"--opt-config names {', '.join(map(repr, unknown_keys))}, not an optimizer of this compare")
    counts = {n: sum(1 for m, _ in items if m == n) for n, _ in items}
    specs: list[RunSpec] = []
    for name, inline in items:
        label = name
        if counts[name] > 1:  # label by what the user set on the list (an artifact by its folder name)
            shown = {k: Path(str(v)).name if k == "artifact" else v for k, v in inline.items()}
            label = f"{name}@{','.join(f'{k}={fmt_value(v)}' for k, v in shown.items())}" if shown else name
        hp = {**opt_config.get(name, {}), **opt_config.get(label, {}), **inline}
        specs.append(RunSpec(label=label, optimizer=name, hparams=hp, base=label))
    labels = [s.label for s in specs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise L2ZOError(f"--optimizers lists {', '.join(map(repr, dupes))} twice with the same settings; "
                        "give each repeat different hyperparameters (e.g. mezo:lr=1e-5,mezo:lr=1e-4)")  # fmt: skip
    return specs


def expand_sweep(specs: list[RunSpec], points: list[dict[str, Any]]) -> list[RunSpec]:
    """One RunSpec per (spec, sweep point); the point overrides the spec's value for its keys."""
    if not points:
        return specs
    out = []
    for spec in specs:
        for point in points:
            sub = ",".join(f"{k}={fmt_value(v)}" for k, v in point.items())
            out.append(RunSpec(label=f"{spec.label}/{sub}", optimizer=spec.optimizer,
                               hparams={**spec.hparams, **point}, base=spec.label, sweep=dict(point)))  # fmt: skip
    return out
