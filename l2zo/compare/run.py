"""``run_compare``: every optimizer configuration at every seed on the same data, then tables and plots.

Fairness: one data seed for all runs (same train/dev/test sets), and run seed k for every optimizer at
seed k (same batch order; it also seeds z). Each run's ``batch_digest`` is recorded so the claim can be
checked. Everything the user typed is checked before the first run (and before the folder is made);
after that a failing run (an ``L2ZOError`` such as a non-finite loss, any other exception, or a diverged
dev loss) is recorded as failed with its reason and the other runs go on. A SIGTERM or SIGINT records the
current run as interrupted and stops the compare.

With ``--lr-grid`` the runs are preceded by lr tuning (:mod:`l2zo.compare.tuning`): each optimizer's grid on
the tuning seeds and ``--tune-steps`` steps, in LOGDIR/tune/<label>/lr=<lr>/seed<k>/; the picked lr then runs
at every seed. A tuning run that fails is part of tuning (it loses), not a failure of the compare.

The experiment folder is locked while the compare runs. ``compare.json`` names the experiment (model, task,
data, steps, ...) and says how each run ended; a folder that holds another experiment is refused unless
``--overwrite`` (which removes all of it), and a rerun of the same one is refused unless ``--resume`` (which
skips the runs that finished, tuning runs included, and redoes a run whose tuned lr changed) or ``--overwrite``.
A finished run that --resume would keep under a label must have been made by the same optimizer, artifact and
settings (the lr aside where it is tuned); else the compare is refused, naming what changed.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from l2zo.compare.events import RECORD_TAG, divergence_reason, find_run_folders, load_experiment
from l2zo.compare.spec import (
    CompareConfig,
    RunSpec,
    expand_sweep,
    fmt_value,
    load_opt_config,
    parse_optimizers,
    parse_seeds,
    parse_sweep,
)
from l2zo.compare.tuning import TUNE_DIR, TunePoint, grids_for, pick_lr, pool_seeds
from l2zo.config import PEFT_KEYS, FinetuneConfig, PeftArgs
from l2zo.errors import L2ZOError
from l2zo.learned.artifact import artifact_digest
from l2zo.optim.registry import build_optimizer, get_optimizer_spec, optimizer_specs
from l2zo.optim.run_hparams import optimizer_hparams
from l2zo.tasks.loading import load_task_data
from l2zo.train.logs import quiet_libraries
from l2zo.train.strategies import is_primary, replica_paths
from l2zo.utils.io import dumps_strict, write_json_atomic
from l2zo.utils.rundir import clear_run, locked_run_folder
from l2zo.utils.runstatus import FAILED, INTERRUPTED, OK, RunInterrupted, one_line, record_end, signal_guard

log = logging.getLogger("l2zo")

EXPERIMENT_FILE = "compare.json"
# What makes two compares the same experiment: runs that differ in these are not comparable in one table.
EXPERIMENT_KEYS = ("model", "task", "data_dir", "data_seed", "num_train", "num_dev", "num_test", "steps",
                   "batch_size", "eval_every", "max_length", "precision", "lr_schedule", "tune_steps")  # fmt: skip
# The compare's own files at the experiment root (plots included), removed by --overwrite.
REPORT_FILES = ("summary.md", "summary.csv", "sweep.csv", "tuning.csv", EXPERIMENT_FILE, "dev_loss_vs_steps.png",
                "dev_loss_vs_forwards.png", "dev_loss_vs_time.png", "test_acc.png")  # fmt: skip
FINISHED = (OK, FAILED)  # a run that ended so is not redone by --resume


@dataclass
class Plan:
    """The checked plan: run specs (sweep expanded), seeds, and the config every run starts from."""

    cfg: CompareConfig
    specs: list[RunSpec]
    seeds: list[int]
    sweep_points: list[dict[str, Any]]
    base: FinetuneConfig  # the compare's data and schedule; each run sets its optimizer, seed and folder
    grids: dict[str, list[float]] = field(default_factory=dict)  # label -> lr grid, for the labels tuned
    tune_seeds: list[int] = field(default_factory=lambda: [0])
    tune_steps: int = 0
    baseline: str = ""  # the label of the paired table's reference

    def run_dir(self, spec: RunSpec, seed: int) -> Path:
        root = Path(self.cfg.logdir)
        return (root / TUNE_DIR if spec.phase == "tune" else root) / spec.label / f"seed{seed}"

    def finetune_config(self, spec: RunSpec, seed: int) -> FinetuneConfig:
        hp, _ = split_peft(spec.hparams)
        artifact = hp.pop("artifact", None)
        steps = self.tune_steps if spec.phase == "tune" else self.base.steps
        return replace(self.base, optimizer=spec.optimizer, opt_args=hp, seed=seed, steps=steps,
                       artifact=None if artifact is None else str(artifact), logdir=str(self.run_dir(spec, seed)),
                       adapter=run_adapter(spec))  # fmt: skip

    def tune_specs(self, spec: RunSpec) -> list[RunSpec]:
        """The lr-tuning runs of ``spec`` (none when no grid covers it)."""
        return [RunSpec(label=f"{spec.label}/lr={fmt_value(lr)}", optimizer=spec.optimizer,
                        hparams={**spec.hparams, "lr": lr}, base=spec.label, sweep={"lr": lr}, phase="tune")
                for lr in self.grids.get(spec.label, [])]  # fmt: skip

    def tuned(self, spec: RunSpec, picked: float | None) -> RunSpec:
        """``spec`` with its picked lr (None: no tuning run finished, so its runs are recorded as failed)."""
        info = {"grid": self.grids[spec.label], "picked": picked, "tune_steps": self.tune_steps,
                "tune_seeds": self.tune_seeds}  # fmt: skip
        if self.cfg.lr_tolerance:  # recorded only where set, so the records of earlier compares read the same
            info["tolerance"] = self.cfg.lr_tolerance
        hp = spec.hparams if picked is None else {**spec.hparams, "lr": picked}
        return replace(spec, hparams=hp, tuned=info)

    def runs(self) -> dict[Path, tuple[RunSpec, int]]:
        """Every run folder of the plan -> (spec, seed): the runs at each seed and the tuning runs."""
        runs = {self.run_dir(s, k): (s, k) for s in self.specs for k in self.seeds}
        runs.update(
            {self.run_dir(t, k): (t, k) for s in self.specs for t in self.tune_specs(s) for k in self.tune_seeds}
        )
        return runs


def run_adapter(spec: RunSpec) -> PeftArgs:
    """The run's PEFT adapter: its ``peft*`` keys (``mezo:peft=lora:peft_rank=4``), taken out of its hyperparameters
    by ``split_peft``; full fine-tuning without them."""
    _, peft = split_peft(spec.hparams)
    try:
        return PeftArgs(**peft)
    except L2ZOError as exc:
        raise L2ZOError(f"--optimizers item {spec.label!r}: {exc}") from None


def _changed_hparams(recorded: dict[str, Any], fcfg: FinetuneConfig, *, lr_free: bool) -> list[tuple[str, Any, Any]]:
    """(key, then, now) for each hyperparameter a finished run was made with that the planned run would change.

    Not compared: the seed (the folder's), the artifact (compared by path and weights), and with ``lr_free`` the lr
    (a tuned item's: a kept run whose tuned lr moved is redone). A key the run did not record (an older l2zo) counts
    as the optimizer's default. Both sides go through JSON, as the record did (tuples become lists)."""
    free = {"seed", "artifact"} | ({"lr"} if lr_free else set())
    now = hparams_that_run(fcfg)
    then = {**get_optimizer_spec(fcfg.optimizer).defaults, **recorded}
    norm = json.loads(json.dumps({"then": then, "now": now}, default=str))
    return [(k, norm["then"].get(k), norm["now"][k]) for k in sorted(norm["now"])
            if k not in free and norm["then"].get(k) != norm["now"][k]]  # fmt: skip


def split_peft(hparams: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(optimizer hyperparameters, PEFT keys) of a run's settings."""
    return ({k: v for k, v in hparams.items() if k not in PEFT_KEYS},
            {k: v for k, v in hparams.items() if k in PEFT_KEYS})  # fmt: skip


def hparams_that_run(fcfg: FinetuneConfig) -> dict[str, Any]:
    """The optimizer's defaults overlaid with what the run sets (raises L2ZOError for a bad key)."""
    spec = get_optimizer_spec(fcfg.optimizer)
    hp = {**spec.defaults, **optimizer_hparams(fcfg, spec)}
    hp.pop("seed", None)  # the run seed is a column of its own
    return {k: list(v) if isinstance(v, tuple) else v for k, v in hp.items()}


def make_plan(cfg: CompareConfig) -> Plan:
    """Parse and check everything before any run: optimizers, hyperparameters, sweep, seeds, task, model,
    device, batch size, folder; then build every optimizer once on the model (bad values, artifacts that do
    not fit)."""
    from l2zo.models import load_model
    from l2zo.models.adapters import apply_peft
    from l2zo.train.finetune import check_inputs

    seeds = parse_seeds(cfg.seeds)
    points = parse_sweep(cfg.sweep)
    specs = parse_optimizers(cfg.optimizers, list(optimizer_specs()), load_opt_config(cfg.opt_config))
    base = FinetuneConfig(data=cfg.data, dist=cfg.dist, steps=cfg.steps, eval_every=cfg.eval_every,
                          lr_schedule=cfg.lr_schedule, zo=cfg.zo, progress=cfg.progress)  # fmt: skip
    grids = check_tuning(cfg, specs)
    plan = Plan(cfg=cfg, specs=expand_sweep(specs, points), seeds=seeds, sweep_points=points, base=base, grids=grids,
                tune_seeds=seeds[:1] if cfg.tune_seeds is None else parse_seeds(cfg.tune_seeds, "--tune-seeds"),
                tune_steps=cfg.tune_steps or cfg.steps,
                baseline=resolve_baseline(cfg.baseline, specs))  # fmt: skip
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
    first = plan.finetune_config(plan.specs[0], seeds[0])
    _, data = load_task_data(cfg.data)  # task name, data files, split sizes
    check_inputs(first, data)
    model = load_model(cfg.data.model).model  # a wrong model name fails here, not as N failed runs
    adapted: dict[str, Any] = {}  # one model per adapter (peft changes the model it wraps)
    for spec in plan.specs:
        fcfg = plan.finetune_config(spec, seeds[0])
        try:
            target = model
            if fcfg.adapter.enabled:
                key = repr(fcfg.adapter)
                if key not in adapted:
                    adapted[key] = apply_peft(load_model(cfg.data.model).model, fcfg.adapter, seeds[0]).model
                target = adapted[key]
            build_optimizer(spec.optimizer, target, **optimizer_hparams(fcfg, get_optimizer_spec(spec.optimizer)))
        except L2ZOError as exc:
            raise L2ZOError(f"--optimizers item {spec.label!r}: {exc}") from None
    return plan


def check_tuning(cfg: CompareConfig, specs: list[RunSpec]) -> dict[str, list[float]]:
    """The lr grid of each label to tune; refuses what cannot mean anything (a grid beside --sweep, an lr both
    fixed and tuned, an optimizer without an lr, tuning options without a grid)."""
    if not cfg.lr_grid:
        if cfg.tune_steps is not None or cfg.tune_seeds is not None or cfg.lr_tolerance:
            raise L2ZOError("--tune-steps, --tune-seeds and --lr-tolerance set the lr tuning: give --lr-grid too, "
                            "e.g. --lr-grid 1e-5,2e-5,5e-5")  # fmt: skip
        return {}
    if cfg.sweep:
        raise L2ZOError("--lr-grid and --sweep do not combine: tune the lr with --lr-grid, or sweep with --sweep")
    grids = grids_for(cfg.lr_grid, [s.label for s in specs], {s.label: s.optimizer for s in specs})
    for spec in specs:
        if spec.label not in grids:
            continue
        if "lr" not in get_optimizer_spec(spec.optimizer).defaults:
            raise L2ZOError(f"--lr-grid covers {spec.label!r}, but optimizer {spec.optimizer!r} has no lr; name the "
                            "optimizers to tune, e.g. --lr-grid 'mezo=1e-5,2e-5'")  # fmt: skip
        if "lr" in spec.hparams:
            raise L2ZOError(f"--optimizers item {spec.label!r} fixes lr={fmt_value(spec.hparams['lr'])} and --lr-grid "
                            "tunes it; drop one of the two")  # fmt: skip
    return grids


def resolve_baseline(name: str | None, specs: list[RunSpec]) -> str:
    """The label of the paired table's reference: a run label, else the first run of that optimizer name."""
    if name is None:
        return specs[0].label
    for spec in specs:
        if name in (spec.label, spec.optimizer):
            return spec.label
    raise L2ZOError(f"--baseline {name!r} is not an optimizer of this compare; choose one of: "
                    f"{', '.join(s.label for s in specs)}")  # fmt: skip


def experiment_key(cfg: CompareConfig) -> dict[str, Any]:
    key = {k: getattr(cfg.data if hasattr(cfg.data, k) else cfg, k) for k in EXPERIMENT_KEYS}
    key["tune_steps"] = (cfg.tune_steps or cfg.steps) if cfg.lr_grid else None  # the steps the tuning ran
    return key


def _recorded_experiment(root: Path) -> dict[str, Any] | None:
    """The experiment a folder holds: from its compare.json, else from its runs' records (older compares)."""
    try:
        return dict(json.loads((root / EXPERIMENT_FILE).read_text(encoding="utf-8"))["experiment"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    configs = [r.config for r in load_experiment(root) if r.config]
    return {k: v for k, v in configs[0].items() if k in EXPERIMENT_KEYS} if configs else None


def _clear_experiment(root: Path, runs: list[Path]) -> None:
    """--overwrite: remove every run folder under ``root`` and the compare's own files."""
    for folder in runs:
        if folder == root:
            clear_run(root)
            continue
        shutil.rmtree(folder)
        parent = folder.parent
        while parent != root and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
    for name in REPORT_FILES:
        (root / name).unlink(missing_ok=True)


def _run_status(folder: Path) -> str | None:
    try:
        return json.loads((folder / "summary.json").read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def prepare_logdir(plan: Plan, overwrite: bool, resume: bool = False) -> set[Path]:
    """Check the (locked) experiment folder against the plan; return the planned run folders to skip.

    Refused, unless ``overwrite`` (then everything there is removed): runs of another experiment (a key of
    ``EXPERIMENT_KEYS`` differs, or unknown); planned runs that exist already, unless ``resume``, which
    skips those that finished (ok or failed) and redoes the others.
    """
    root = Path(plan.cfg.logdir)
    old = find_run_folders(root) if root.is_dir() else []
    if overwrite:
        _clear_experiment(root, old)
        return set()
    if not old:
        return set()
    fix = "pick another --logdir, or pass --overwrite to replace it"
    theirs = _recorded_experiment(root)
    if theirs is None:
        raise L2ZOError(f"{root} holds runs that no l2zo compare recorded; {fix}")
    mine = experiment_key(plan.cfg)
    diff = [k for k in EXPERIMENT_KEYS if k in theirs and theirs[k] != mine[k]]
    if diff:
        shown = "; ".join(f"{k}: {theirs[k]!r} there, {mine[k]!r} now" for k in diff)
        raise L2ZOError(f"{root} holds another experiment ({shown}); {fix}")
    planned = {f.resolve() for f in plan.runs()}
    clash = [f for f in old if f.resolve() in planned]
    if clash and not resume:
        raise L2ZOError(f"{clash[0]} already holds a run of this experiment; pass --resume to keep the finished runs "
                        "and redo the others, --overwrite to start over, or pick another --logdir")  # fmt: skip
    finished = {f.resolve() for f in clash if _run_status(f) in FINISHED}
    _refuse_other_runs(plan, finished)
    return finished


def _refuse_other_runs(plan: Plan, finished: set[Path]) -> None:
    """A finished run that --resume would keep must be the planned run: the same optimizer, the same artifact (path,
    and weights sha256 where the run recorded it) and the same hyperparameters other than the tuned lr. Else a label
    reused for another optimizer, a re-made artifact or an edited setting would silently mix two experiments in one
    table."""
    planned = {folder.resolve(): run for folder, run in plan.runs().items()}
    digests: dict[str | None, str | None] = {}  # artifact path -> its weights' sha256, each manifest read once
    for folder in sorted(finished):
        spec, seed = planned[folder]
        fcfg = plan.finetune_config(spec, seed)
        summary = _read_summary(folder)
        ran_art = (summary.get("hparams") or {}).get("artifact")
        now = (fcfg.optimizer, None if fcfg.artifact is None else str(Path(fcfg.artifact)))
        then = (summary.get("optimizer"), None if ran_art is None else str(Path(ran_art)))
        if fcfg.artifact not in digests:
            digests[fcfg.artifact] = artifact_digest(fcfg.artifact)
        ran_sha, now_sha = summary.get("artifact_sha256"), digests[fcfg.artifact]
        tuned = spec.label in plan.grids  # its lr is the tuning's to change
        changed = [] if then != now else _changed_hparams(summary.get("hparams") or {}, fcfg, lr_free=tuned)
        if then != now or (ran_sha and now_sha and ran_sha != now_sha) or changed:
            made = (f"{' '.join(filter(None, then))}, not {' '.join(filter(None, now))}" if then != now
                    else f"other weights at {now[1]} (sha256 {ran_sha[:12]}, now {now_sha[:12]})" if not changed
                    else ", ".join(f"{k}={a}, not {k}={b}" for k, a, b in changed))  # fmt: skip
            raise L2ZOError(f"{folder} holds a finished run of {spec.base!r} made with {made}; give the item another "
                            "label (learned=DIR:label=NAME), or pass --overwrite to start over")  # fmt: skip


def _reset_peak_memory() -> None:
    """Start each run's peak-memory count afresh (CUDA: allocator stats; Linux CPU: the RSS high-water mark)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:  # "5" resets VmHWM, which getrusage's ru_maxrss reports; harmless where unsupported
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def write_record(folder: Path, record: dict[str, Any]) -> None:
    """The run's events-only record (read back by ``l2zo report``): one JSON text summary."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(folder), filename_suffix=".compare")
    try:
        writer.add_text(RECORD_TAG, dumps_strict(record, sort_keys=True), global_step=0)
    finally:
        writer.close()


def run_one(plan: Plan, spec: RunSpec, seed: int, order: int) -> dict[str, Any]:
    """Run one (spec, seed); never raises for a failing optimizer. Returns the record it wrote."""
    from l2zo.train.finetune import run_finetune

    fcfg = plan.finetune_config(spec, seed)
    folder = Path(fcfg.logdir)
    record = base_record(plan, spec, seed, order)
    _reset_peak_memory()
    t0 = time.perf_counter()
    try:
        summary = run_finetune(fcfg, overwrite=True)
        dev = [(h["step"], h["loss"]) for h in summary["dev_history"]]
        reason = divergence_reason(dev)
        record.update(status="failed" if reason else "ok", reason=reason or "")
    except RunInterrupted as exc:  # recorded (``l2zo report`` shows it), then the whole compare stops
        if folder.is_dir():
            summary = _read_summary(folder)
            record.update(status=INTERRUPTED, reason=f"interrupted by {exc.signame}",
                          batch_digest=summary.get("batch_digest"), steps_done=summary.get("steps_done"))  # fmt: skip
            write_record(folder, record)
        raise
    except Exception as exc:  # a failing optimizer must never abort the compare
        log.debug("run %s seed %d failed", spec.label, seed, exc_info=True)
        summary = _read_summary(folder)
        record.update(status="failed", reason=one_line(exc))
    record["batch_digest"] = summary.get("batch_digest")
    record["steps_done"] = summary.get("steps_done")
    folder.mkdir(parents=True, exist_ok=True)
    write_record(folder, record)
    record["wall_s"] = time.perf_counter() - t0
    record["test_acc"] = summary.get("test_acc")
    record["dev_loss_final"] = summary.get("dev_loss_final")
    return record


def base_record(plan: Plan, spec: RunSpec, seed: int, order: int) -> dict[str, Any]:
    """What a run's record says before it runs: who it is, the hyperparameters that run, the compare's config."""
    fcfg = plan.finetune_config(spec, seed)
    return {
        "label": spec.label, "base": spec.base, "optimizer": spec.optimizer, "sweep": spec.sweep, "seed": seed,
        "order": order, "hparams": hparams_that_run(fcfg), "phase": spec.phase, "tuned": spec.tuned,
        "forwards_per_step": get_optimizer_spec(spec.optimizer).forwards_per_step,
        "config": {**{k: getattr(plan.cfg.data, k) for k in ("model", "task", "batch_size", "num_train", "num_dev",
                                                             "num_test", "data_seed", "precision", "max_length")},
                   **{k: getattr(plan.cfg, k) for k in ("steps", "eval_every", "lr_schedule", "select")},
                   "tune_steps": experiment_key(plan.cfg)["tune_steps"],
                   "tune_seeds": plan.tune_seeds if plan.grids else None, "baseline": plan.baseline},
    }  # fmt: skip


def record_untuned(plan: Plan, spec: RunSpec, seed: int, order: int) -> dict[str, Any]:
    """A run that cannot start because no lr of its grid finished: recorded as failed, saying so."""
    folder = plan.run_dir(spec, seed)
    record = base_record(plan, spec, seed, order)
    record.update(status=FAILED, reason=f"lr tuning: no lr of the grid {spec.tuned['grid']} finished on every "
                  f"tuning seed ({', '.join(map(str, plan.tune_seeds))}); see {TUNE_DIR}/", batch_digest=None, steps_done=0)  # fmt: skip
    if folder.is_dir():
        clear_run(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_record(folder, record)
    return {**record, "wall_s": 0.0, "test_acc": None, "dev_loss_final": None}


def _read_summary(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def _fmt(x: Any, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def run_compare(cfg: CompareConfig, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    """Check the plan, run every (spec, seed), then write summary.md, summary.csv and the plots.

    The returned report's ``records`` say how each run ended (``status``). Raises ``RunInterrupted`` on a
    signal, after recording the current run as interrupted and the compare's state in compare.json.
    """
    quiet_libraries()
    if cfg.dist.world_size > 1 and (resume or cfg.lr_grid):
        # Both decide what runs from rank 0's files (finished runs, tuning curves): the other processes lack them.
        raise L2ZOError(f"{'--resume' if resume else '--lr-grid'} runs on one process for now: use --devices 1 "
                        "--num-nodes 1 (or pass the tuned lr as NAME:lr=... on many)")  # fmt: skip
    with signal_guard(), replica_paths(cfg, "logdir") as cfg:
        plan = make_plan(cfg)
        with locked_run_folder(cfg.logdir) as folder:
            skip = prepare_logdir(plan, overwrite, resume)
            folder.started = True
            return _run_all(plan, skip)


def _run_all(plan: Plan, skip: set[Path]) -> dict[str, Any]:
    from l2zo.compare.summary import write_report

    cfg = plan.cfg
    root = Path(cfg.logdir)
    n_tune = sum(len(g) for g in plan.grids.values()) * len(plan.tune_seeds)
    total = len(plan.specs) * len(plan.seeds)
    state: dict[str, Any] = {"status": "running", "experiment": experiment_key(cfg), "runs": []}
    if plan.grids:
        state["tuning"] = {}
    log.info("l2zo compare: %s%d runs (%d configurations x %d seeds) into %s%s",
             f"{n_tune} lr-tuning runs (seeds {', '.join(map(str, plan.tune_seeds))}, {plan.tune_steps} steps), then "
             if n_tune else "",
             total, len(plan.specs), len(plan.seeds), cfg.logdir,
             f"; {len(skip)} finished before, kept" if skip else "")  # fmt: skip
    write_json_atomic(root / EXPERIMENT_FILE, state)
    records: list[dict[str, Any]] = []
    tune_records: list[dict[str, Any]] = []
    current: tuple[RunSpec, int] | None = None

    def note(rec: dict[str, Any], folder: Path, where: str) -> None:
        state["runs"].append(_run_entry(rec, folder))
        write_json_atomic(root / EXPERIMENT_FILE, state)
        status = "ok" if rec["status"] == "ok" else f"FAILED ({rec['reason']})"
        log.info("[%s] %s seed %d: %s; dev loss %s, test acc %s (%s)", where, rec["label"], rec["seed"], status,
                 _fmt(rec["dev_loss_final"], ".4f"), _fmt(rec["test_acc"], ".3f"),
                 "kept" if rec.get("kept") else f"{rec['wall_s']:.0f} s")  # fmt: skip

    try:
        specs = list(plan.specs)
        for i, spec in enumerate(plan.specs):  # lr tuning first: its picks decide what the seeds run
            if spec.label not in plan.grids:
                continue
            points = []
            for t in plan.tune_specs(spec):
                for k in plan.tune_seeds:
                    folder = plan.run_dir(t, k)
                    current = (t, k)
                    kept = folder.resolve() in skip
                    rec = _kept_record(folder, root) if kept else run_one(plan, t, k, order=i)
                    tune_records.append(rec)
                    note({**rec, "phase": "tune"}, folder, f"tune {len(tune_records)}/{n_tune}")
                    points.append(_tune_point(folder, root, cfg.select, t.sweep["lr"], rec["status"] == "ok"))
            points = pool_seeds(points)
            picked = pick_lr(points, cfg.lr_tolerance)
            specs[i] = plan.tuned(spec, picked)
            state["tuning"][spec.label] = {**specs[i].tuned, "scores": {fmt_value(p.lr): p.score for p in points}}
            log.info("lr tuning of %s: %s", spec.label, "no lr finished" if picked is None else f"lr {picked:g}")
        for i, spec in enumerate(specs):
            for seed in plan.seeds:
                folder = plan.run_dir(spec, seed)
                current = (spec, seed)
                rec = _kept_record(folder, root) if folder.resolve() in skip else None
                if rec is not None and spec.tuned and rec["hparams"].get("lr") != spec.tuned["picked"]:
                    rec = None  # it ran at an lr that tuning no longer picks (the grid changed): run it again
                if rec is None:
                    untuned = spec.tuned and spec.tuned["picked"] is None
                    rec = record_untuned(plan, spec, seed, i) if untuned else run_one(plan, spec, seed, order=i)
                records.append(rec)
                note(rec, folder, f"{len(records)}/{total}")
    except BaseException as exc:
        if isinstance(exc, RunInterrupted) and current is not None:
            spec, seed = current
            state["runs"].append({"label": spec.label, "seed": seed, "status": INTERRUPTED,
                                  "reason": f"interrupted by {exc.signame}",
                                  "folder": str(plan.run_dir(spec, seed)),
                                  **({"phase": "tune"} if spec.phase == "tune" else {})})  # fmt: skip
            what = "lr-tuning run" if spec.phase == "tune" else "run"
            exc.detail = (f"{what} {spec.label} seed {seed} recorded as interrupted, {len(records)} of {total} runs "
                          f"done{f' after {len(tune_records)} of {n_tune} tuning runs' if n_tune else ''}; "
                          f"{root / EXPERIMENT_FILE} says which. Continue with the same command and --resume")  # fmt: skip
        record_end(state, exc)
        write_json_atomic(root / EXPERIMENT_FILE, state)
        raise
    # The report reads the runs' TensorBoard events, which rank 0 alone writes; the other processes' is empty.
    report = write_report(root) if is_primary(cfg.dist) else {}
    report["records"] = records
    report["tune_records"] = tune_records
    bad = [r for r in records if r["status"] != "ok"]  # a tuning run that failed lost; the compare did not fail
    record_end(state, None)
    if bad:
        state.update(status=FAILED, exit_code=1, error=f"{len(bad)} of {len(records)} runs failed")
    write_json_atomic(root / EXPERIMENT_FILE, state)
    return report


def _tune_point(folder: Path, root: Path, select: str, lr: float, ok: bool) -> TunePoint:
    """A tuning run's point: its dev-loss score (None: failed) and step-0 dev loss, read back from its events
    as the report reads them."""
    from l2zo.compare.events import read_run
    from l2zo.compare.protocol import dev_score, dev_start

    run = read_run(folder, root)
    return TunePoint(lr, dev_score([run], select), ok, dev_start(run))


def _run_entry(rec: dict[str, Any], folder: Path) -> dict[str, Any]:
    entry = {"label": rec["label"], "seed": rec["seed"], "status": rec["status"], "reason": rec.get("reason", ""),
             "folder": str(folder)}  # fmt: skip
    return {**entry, "phase": "tune"} if rec.get("phase") == "tune" else entry


def _kept_record(folder: Path, root: Path) -> dict[str, Any]:
    """The record of a run that finished in an earlier compare (--resume keeps it)."""
    from l2zo.compare.events import read_run

    run = read_run(folder, root)
    summary = _read_summary(folder)
    return {"label": run.label, "seed": run.seed, "status": run.status, "reason": run.reason, "kept": True,
            "test_acc": summary.get("test_acc"), "dev_loss_final": summary.get("dev_loss_final"), "wall_s": 0.0,
            "batch_digest": summary.get("batch_digest"), "steps_done": summary.get("steps_done"),
            "hparams": run.hparams or {}}  # fmt: skip
