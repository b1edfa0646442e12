"""``run_compare``: every optimizer configuration at every seed on the same data, then tables and plots.

Fairness: one data seed for all runs (same train/dev/test sets), and run seed k for every optimizer at
seed k (same batch order; it also seeds z). Each run's ``batch_digest`` is recorded so the claim can be
checked. Everything the user typed is checked before the first run; after that a failing run (an
``L2ZOError`` such as a non-finite loss, any other exception, or a diverged dev loss) is recorded as
failed with its reason and the other runs go on.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from l2zo.compare.events import RECORD_TAG, divergence_reason, find_run_folders
from l2zo.compare.spec import (
    CompareConfig,
    RunSpec,
    expand_sweep,
    load_opt_config,
    parse_optimizers,
    parse_seeds,
    parse_sweep,
)
from l2zo.config import FinetuneConfig
from l2zo.errors import L2ZOError
from l2zo.optim.run_hparams import optimizer_hparams
from l2zo.optim.registry import get_optimizer_spec, optimizer_specs
from l2zo.tasks.loading import load_task_data
from l2zo.train.logs import quiet_libraries

log = logging.getLogger("l2zo")

_RUN_FILES = ("summary.json", "config.yaml", "hparams.yaml")


@dataclass
class Plan:
    """The checked plan: run specs (sweep expanded), seeds, and the config every run starts from."""

    cfg: CompareConfig
    specs: list[RunSpec]
    seeds: list[int]
    sweep_points: list[dict[str, Any]]
    base: FinetuneConfig  # the compare's data and schedule; each run sets its optimizer, seed and folder

    def run_dir(self, spec: RunSpec, seed: int) -> Path:
        return Path(self.cfg.logdir) / spec.label / f"seed{seed}"

    def finetune_config(self, spec: RunSpec, seed: int) -> FinetuneConfig:
        hp = dict(spec.hparams)
        artifact = hp.pop("artifact", None)
        return replace(self.base, optimizer=spec.optimizer, opt_args=hp, seed=seed,
                       artifact=None if artifact is None else str(artifact), logdir=str(self.run_dir(spec, seed)))  # fmt: skip


def hparams_that_run(fcfg: FinetuneConfig) -> dict[str, Any]:
    """The optimizer's defaults overlaid with what the run sets (raises L2ZOError for a bad key)."""
    spec = get_optimizer_spec(fcfg.optimizer)
    hp = {**spec.defaults, **optimizer_hparams(fcfg, spec)}
    hp.pop("seed", None)  # the run seed is a column of its own
    return {k: list(v) if isinstance(v, tuple) else v for k, v in hp.items()}


def make_plan(cfg: CompareConfig) -> Plan:
    """Parse and check everything before any run: optimizers, hyperparameters, sweep, seeds, task, model."""
    from l2zo.models import load_model

    seeds = parse_seeds(cfg.seeds)
    points = parse_sweep(cfg.sweep)
    specs = parse_optimizers(cfg.optimizers, list(optimizer_specs()), load_opt_config(cfg.opt_config))
    base = FinetuneConfig(data=cfg.data, steps=cfg.steps, eval_every=cfg.eval_every, lr_schedule=cfg.lr_schedule,
                          cache_z=cfg.cache_z, progress=cfg.progress)  # fmt: skip
    plan = Plan(cfg=cfg, specs=expand_sweep(specs, points), seeds=seeds, sweep_points=points, base=base)
    for spec in plan.specs:
        fcfg = plan.finetune_config(spec, seeds[0])
        try:
            hparams_that_run(fcfg)
        except L2ZOError as exc:
            raise L2ZOError(f"--optimizers item {spec.label!r}: {exc}") from None
        if spec.optimizer == "learned" and fcfg.artifact is None:
            raise L2ZOError("optimizer 'learned' needs an artifact folder: write it as learned=DIR in --optimizers")
        if fcfg.artifact is not None:
            from l2zo.learned.artifact import read_manifest

            read_manifest(fcfg.artifact)
    load_task_data(cfg.data)  # task name, data files, split sizes
    load_model(cfg.data.model)  # a wrong model name fails here, not as N failed runs
    return plan


def prepare_logdir(plan: Plan, overwrite: bool) -> None:
    """Refuse to mix with earlier runs unless ``overwrite``; then clear those runs' files (events, summaries)."""
    root = Path(plan.cfg.logdir)
    planned = {plan.run_dir(s, k).resolve() for s in plan.specs for k in plan.seeds}
    old = find_run_folders(root) if root.is_dir() else []
    clash = [f for f in old if f.resolve() in planned]
    if clash and not overwrite:
        raise L2ZOError(f"{clash[0]} already holds a run; pick another --logdir or pass --overwrite")
    if overwrite:  # stale runs of an earlier compare would otherwise show up in the tables
        for folder in old:
            for f in [*folder.glob("events.out.tfevents.*"), *(folder / n for n in _RUN_FILES)]:
                f.unlink(missing_ok=True)


def _reset_peak_memory() -> None:
    """Start each run's peak-memory count afresh (CUDA: allocator stats; Linux CPU: the RSS high-water mark)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:  # "5" resets VmHWM, which getrusage's ru_maxrss reports; harmless where unsupported
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, L2ZOError) else f"{type(exc).__name__}: {text}"


def write_record(folder: Path, record: dict[str, Any]) -> None:
    """The run's events-only record (read back by ``l2zo report``): one JSON text summary."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(folder), filename_suffix=".compare")
    try:
        writer.add_text(RECORD_TAG, json.dumps(record, sort_keys=True, default=str), global_step=0)
    finally:
        writer.close()


def run_one(plan: Plan, spec: RunSpec, seed: int, order: int) -> dict[str, Any]:
    """Run one (spec, seed); never raises for a failing optimizer. Returns the record it wrote."""
    from l2zo.train.finetune import run_finetune

    fcfg = plan.finetune_config(spec, seed)
    folder = Path(fcfg.logdir)
    record: dict[str, Any] = {
        "label": spec.label, "base": spec.base, "optimizer": spec.optimizer, "sweep": spec.sweep, "seed": seed,
        "order": order, "hparams": hparams_that_run(fcfg),
        "forwards_per_step": get_optimizer_spec(spec.optimizer).forwards_per_step,
        "config": {**{k: getattr(plan.cfg.data, k) for k in ("model", "task", "batch_size", "num_train", "num_dev",
                                                             "num_test", "data_seed", "precision", "max_length")},
                   **{k: getattr(plan.cfg, k) for k in ("steps", "eval_every", "lr_schedule", "select")}},
    }  # fmt: skip
    _reset_peak_memory()
    t0 = time.perf_counter()
    try:
        summary = run_finetune(fcfg, overwrite=True)
        dev = [(h["step"], h["loss"]) for h in summary["dev_history"]]
        reason = divergence_reason(dev)
        record.update(status="failed" if reason else "ok", reason=reason or "")
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # a failing optimizer must never abort the compare
        log.debug("run %s seed %d failed", spec.label, seed, exc_info=True)
        summary = _read_summary(folder)
        record.update(status="failed", reason=_one_line(exc))
    record["batch_digest"] = summary.get("batch_digest")
    record["steps_done"] = summary.get("steps_done")
    folder.mkdir(parents=True, exist_ok=True)
    write_record(folder, record)
    record["wall_s"] = time.perf_counter() - t0
    record["test_acc"] = summary.get("test_acc")
    record["dev_loss_final"] = summary.get("dev_loss_final")
    return record


def _read_summary(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def _fmt(x: Any, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)




def run_compare(cfg: CompareConfig, overwrite: bool = False) -> dict[str, Any]:
    """Check the plan, run every (spec, seed), then write summary.md, summary.csv and the plots."""
    from l2zo.compare.summary import write_report

    quiet_libraries()

    plan = make_plan(cfg)
    prepare_logdir(plan, overwrite)
    total = len(plan.specs) * len(plan.seeds)
    log.info("l2zo compare: %d runs (%d configurations x %d seeds) into %s", total, len(plan.specs),
             len(plan.seeds), cfg.logdir)  # fmt: skip
    records = []
    for i, spec in enumerate(plan.specs):
        for seed in plan.seeds:
            rec = run_one(plan, spec, seed, order=i)
            records.append(rec)
            status = "ok" if rec["status"] == "ok" else f"FAILED ({rec['reason']})"
            log.info("[%d/%d] %s seed %d: %s; dev loss %s, test acc %s (%.0f s)", len(records), total,
                     spec.label, seed, status, _fmt(rec["dev_loss_final"], ".4f"), _fmt(rec["test_acc"], ".3f"),
                     rec["wall_s"])  # fmt: skip
    report = write_report(Path(cfg.logdir))
    report["records"] = records
    return report
