"""What ``l2zo compare`` runs: the compare config, the optimizer list, per-run hyperparameters, sweeps.

``--optimizers`` is a comma-separated list of items ``NAME[=ARTIFACT][:key=value[:key=value...]]``:
``mezo``, ``learned=DIR`` (the learned optimizer with an artifact folder), ``mezo:lr=1e-4:eps=1e-3``. The
``peft*`` keys of ``l2zo finetune`` are per-run options too: ``mezo,mezo:peft=lora`` runs full fine-tuning and
LoRA side by side (``mezo:peft=lora:peft_rank=4:peft_target_modules=q_proj k_proj``; see ``PeftArgs``).
A bare ``key=value`` item (its key not an optimizer) continues the previous item, so
``mezo:lr=1e-4,eps=1e-3`` means the same as the colon form. In YAML, ``optimizers`` may also be a list
whose entries are such strings or mappings ``{name: mezo, lr: 1e-4}`` (``artifact: DIR`` for learned).
``--opt-config FILE`` maps an optimizer name (or a run label) to ``{key: value}``; items on the list win
over the file. The same optimizer may appear more than once; its runs are then labelled by what differs
(``mezo@lr=1e-05``), unless an item names its own label with the reserved key ``label``
(``learned=DIR:label=learned-es``): a stable label lets a resumed compare add runs beside finished ones
without renaming them. Values are read by ``l2zo.config.parse_scalar``, as ``--opt-args`` values are.

Everything here is checked before any run starts: a mistake is one ``L2ZOError`` line.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any, Literal

from l2zo.compare.tuning import check_tolerance
from l2zo.config import (
    DataArgs,
    DistributedArgs,
    Schedule,
    ZArgs,
    check_fields,
    parse_pair,
    parse_scalar,
    read_yaml_mapping,
)
from l2zo.config.values import key_name
from l2zo.errors import L2ZOError

OptimizerEntry = str | dict[str, Any]


def _compare_data() -> DataArgs:
    return DataArgs(task="synth-sentiment", num_train=1000, num_test=1000)


@dataclasses.dataclass
class CompareConfig:
    """Comparison of optimizers"""

    data: DataArgs = dataclasses.field(default_factory=_compare_data)
    """the model and the data, the same for every run"""
    dist: DistributedArgs = dataclasses.field(default_factory=DistributedArgs)
    """devices, nodes and the strategy of every run"""
    zo: ZArgs = dataclasses.field(default_factory=ZArgs)
    """how z is drawn and how many passes a step makes, for every ZO run"""
    optimizers: list[OptimizerEntry] | str = "mezo"
    """comma list: NAME, learned=DIR, NAME:key=value[:key=value] (a name may repeat; keys: the optimizer's, the
    PEFT ones, e.g. mezo,mezo:peft=lora, and label=L to name the run); in YAML also a list of such strings or of
    {name: NAME, key: value, ...} mappings"""
    opt_config: dict[str, Any] | str | None = None
    """YAML file (or, in --config, a mapping): optimizer (or run label) -> {key: value}"""
    steps: int = 200
    """optimizer steps per run"""
    seeds: list[int] | int | str = "0"
    """run seeds, e.g. 0,1,2 (batch order and z); every optimizer gets each seed"""
    logdir: str = "runs/compare"
    """experiment folder: runs go to LOGDIR/<run>/seed<k>/, tables and plots to LOGDIR"""
    sweep: dict[str, Any] | str | None = None
    """KEY=v1,v2,... (e.g. lr=1e-7,1e-6,1e-5; several keys: 'lr=..;eps=..'): run each point, pick on dev"""
    select: Literal["final", "best"] = "final"
    """sweep and lr-tuning selection: 'final' or 'best' dev loss (sweeps: mean over seeds); never test"""
    lr_grid: list[float] | dict[str, Any] | str | None = None
    """tune each optimizer's lr on dev first: v1,v2,... for every optimizer, or NAME=v1,v2;NAME=... per optimizer
    (a bare list covers the others); each lr runs on the --tune-seeds for --tune-steps steps, the lowest mean dev
    loss (--select) wins, an lr that failed or diverged on any tuning seed never does; then every seed runs with
    the picked lr"""
    tune_steps: int | None = None
    """optimizer steps of each lr-tuning run (default: --steps)"""
    tune_seeds: list[int] | int | str | None = None
    """the seeds of the lr-tuning runs, e.g. 100 or 100,101 (default: the first of --seeds); 2+ keep an lr that
    survives one seed by luck from being picked"""
    lr_tolerance: float = 0.0
    """pick the smallest lr of the grid whose dev-loss decrease is within this fraction of the best lr's (e.g.
    0.05), instead of the best: a best lr that gains a few percent over the next smaller one sits at the edge
    of stability, where some seeds diverge; 0 picks the lowest dev loss"""
    baseline: str | None = None
    """the reference of the paired table (final dev loss differences with a 95% CI over seeds, forwards to
    reach its final dev loss): an optimizer name or run label (default: the first optimizer listed)"""
    eval_every: int = 100
    """evaluate on dev every N steps (resolution of the dev curves)"""
    lr_schedule: Schedule = "constant"
    """constant, or linear (decay to 0)"""
    progress: bool = False
    """show a progress bar per run"""

    def __post_init__(self) -> None:
        check_fields(self, positive=("steps", "eval_every", "tune_steps"))
        check_tolerance(self.lr_tolerance)


@dataclasses.dataclass
class RunSpec:
    """One optimizer configuration to run at every seed.

    Attributes:
        label: unique name; also the run folder under LOGDIR (sweep points add a sub-folder).
        optimizer: the registry name.
        hparams: hyperparameters given by the user (file and list), over the optimizer's defaults.
        base: the label before a sweep point was applied (== label without a sweep).
        sweep: the sweep point, e.g. {"lr": 1e-6}; empty without a sweep.
        phase: "run" (a run of the comparison) or "tune" (an lr-tuning run, see :mod:`l2zo.compare.tuning`).
        tuned: for a run whose lr was tuned: {"grid": [...], "picked": lr, "tune_steps": n, "tune_seeds": [k, ...]}.
    """

    label: str
    optimizer: str
    hparams: dict[str, Any] = dataclasses.field(default_factory=dict)
    base: str = ""
    sweep: dict[str, Any] = dataclasses.field(default_factory=dict)
    phase: Literal["run", "tune"] = "run"
    tuned: dict[str, Any] = dataclasses.field(default_factory=dict)


def fmt_value(value: Any) -> str:
    """A short, stable text for a hyperparameter value (labels, folder names, tables)."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(fmt_value(v) for v in value) + ")"
    return str(value)


def fmt_hparams(hp: dict[str, Any]) -> str:
    return " ".join(f"{k}={fmt_value(v)}" for k, v in sorted(hp.items()))


def parse_seeds(value: str | list[int] | int, flag: str = "--seeds") -> list[int]:
    """'0,1,2' (or a list, or one int) -> [0, 1, 2]; ``flag`` names the option in errors."""
    items = value if isinstance(value, list) else str(value).split(",")
    try:
        seeds = [int(str(s).strip()) for s in items if str(s).strip()]
    except ValueError:
        raise L2ZOError(f"bad {flag} {value!r}: expected integers like 0,1,2") from None
    if not seeds:
        raise L2ZOError(f"{flag} is empty: give at least one seed, e.g. {flag} 0")
    if len(set(seeds)) != len(seeds):
        raise L2ZOError(f"{flag} repeats a seed: {value!r}")
    return seeds


def parse_sweep(value: str | dict[str, Any] | None) -> list[dict[str, Any]]:
    """'lr=1e-7,1e-6' -> [{'lr': 1e-7}, {'lr': 1e-6}]; several keys ('lr=..;eps=..') give their grid."""
    if value is None or value == "":
        return []
    if isinstance(value, dict):
        axes = {key_name(k): v if isinstance(v, list) else [v] for k, v in value.items()}
        axes = {k: [parse_scalar(x) if isinstance(x, str) else x for x in vs] for k, vs in axes.items()}
    else:
        axes = {}
        for part in filter(None, (p.strip() for p in value.split(";"))):
            if "=" not in part:
                raise L2ZOError(f"bad --sweep {value!r}: expected KEY=v1,v2,... (e.g. lr=1e-7,1e-6,1e-5)")
            key, values = part.split("=", 1)
            axes[key_name(key)] = [parse_scalar(v) for v in values.split(",") if v.strip()]
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
    data = value if isinstance(value, dict) else read_yaml_mapping(value, "--opt-config file")
    if not all(isinstance(v, dict) or v is None for v in data.values()):
        raise L2ZOError("--opt-config must map optimizer names to {key: value} mappings, e.g. 'mezo: {lr: 1e-4}'")
    return {str(k): _hparams(v or {}) for k, v in data.items()}


def _hparams(mapping: dict[str, Any]) -> dict[str, Any]:
    """Keys with underscores; text values read as on the command line (quoted YAML numbers included)."""
    return {key_name(k): parse_scalar(v) if isinstance(v, str) else v for k, v in mapping.items()}


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
        hp.update([parse_pair(pair, "--optimizers")])
    return name.strip(), hp


def _entry_item(entry: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A YAML entry {name: mezo, lr: 1e-4} -> ('mezo', {'lr': 1e-4})."""
    hp = _hparams(entry)
    name = hp.pop("name", None)
    if not isinstance(name, str) or not name:
        raise L2ZOError(f"--optimizers entry {entry!r} needs a name, e.g. {{name: mezo, lr: 1e-4}}")
    if "artifact" in hp:
        hp["artifact"] = str(hp["artifact"])
    return name, hp


def optimizer_items(value: list[OptimizerEntry] | str, known: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """(name, hyperparameters) of each ``--optimizers`` item: compact strings and YAML mappings alike."""
    items: list[tuple[str, dict[str, Any]]] = []
    for entry in value if isinstance(value, list) else [value]:
        if isinstance(entry, dict):
            items.append(_entry_item(entry))
            continue
        for raw in filter(None, (s.strip() for s in str(entry).split(","))):
            head = raw.split(":")[0].split("=")[0].strip()
            if "=" in raw and ":" not in raw and head not in known:
                if not items:  # a continuation with nothing to continue
                    raise L2ZOError(f"bad --optimizers item {raw!r}: expected an optimizer name first")
                items[-1][1].update([parse_pair(raw, "--optimizers")])
                continue
            items.append(_parse_item(raw))
    return items


def parse_optimizers(value: list[OptimizerEntry] | str, known: list[str],
                     opt_config: dict[str, dict[str, Any]]) -> list[RunSpec]:  # fmt: skip
    """Split the ``--optimizers`` list into labelled ``RunSpec`` (hyperparameters not yet validated)."""
    items = optimizer_items(value, known)
    if not items:
        raise L2ZOError("--optimizers is empty: name at least one, e.g. --optimizers mezo,zo-adam")
    for name, _ in items:
        if name not in known:
            raise L2ZOError(f"unknown optimizer {name!r} in --optimizers; valid choices: {', '.join(sorted(known))}")
    given = {str(hp["label"]).strip() for _, hp in items if hp.get("label")}
    unknown_keys = sorted(set(opt_config) - set(known) - {n for n, _ in items} - given)
    if unknown_keys:
        raise L2ZOError(f"--opt-config names {', '.join(map(repr, unknown_keys))}, not an optimizer of this compare")
    counts = {n: sum(1 for m, _ in items if m == n) for n, _ in items}
    specs: list[RunSpec] = []
    for name, inline in items:
        inline = dict(inline)
        explicit = str(inline.pop("label", "") or "").strip()
        label = explicit or name
        if "/" in label or label.startswith("."):
            raise L2ZOError(f"--optimizers label {label!r} must be a plain name (it names a run folder)")
        if not explicit and counts[name] > 1:  # label by what the user set on the list (an artifact by its folder name)
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
