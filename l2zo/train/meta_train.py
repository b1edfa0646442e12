"""``run_meta_train``: load the model and the task family, meta-train the variance net, save the artifact.

The run folder (``cfg.logdir``, under runs/) receives the TensorBoard events, the resolved config.yaml,
resumable Lightning checkpoints (checkpoints/last.ckpt) and summary.json (``running``, then how the run
ended: see ``l2zo.utils.runstatus``). The artifact goes to ``cfg.output`` (e.g. checkpoints/tiny/<name>),
written atomically by ``save_artifact`` once training is done.

A SIGTERM or SIGINT ends the current meta-step, saves checkpoints/last.ckpt, records ``interrupted`` and
prints the command that resumes; the final state is saved too before the artifact is written, so a signal
during that write loses nothing. ``--resume`` takes the checkpoint's config as it was: only the step budget
(and where things go, and how often they are logged) may change.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import pickle
import shlex
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, IterableDataset

from l2zo.blockstats.static import CurvatureTask, StaticCurvature, measure_static_curvature
from l2zo.config import config_to_dict
from l2zo.engine import Block, partition
from l2zo.errors import L2ZOError
from l2zo.learned.artifact import save_artifact
from l2zo.learned.features import FeatureSpec
from l2zo.learned.meta_config import MetaTrainConfig
from l2zo.learned.net import NetSpec, VarianceNet
from l2zo.models import load_model
from l2zo.models.adapters import apply_peft
from l2zo.models.loading import check_device
from l2zo.models.tiny import SHIPPED_ROOT
from l2zo.tasks.loading import load_task_data
from l2zo.tasks.scoring import CandidateScorer
from l2zo.train.lifecycle import StopOnSignal, trainer_call
from l2zo.train.logs import quiet_libraries
from l2zo.train.meta_module import STATE_KEY, MetaTask, MetaTrainModule
from l2zo.train.replicas import ReplicaChecksum
from l2zo.train.strategies import make_strategy, refuse_closureless_precision, replica_paths
from l2zo.utils.io import write_json_atomic, write_yaml_atomic
from l2zo.utils.rundir import check_writable_dir, clear_run, holds_run, locked_run_folder
from l2zo.utils.runstatus import RUNNING, RunInterrupted, SignalGuard, one_line, record_end, signal_guard

log = logging.getLogger("l2zo")

CHECKPOINT_DIR = "checkpoints"  # inside the run folder
LAST_CHECKPOINT = "last.ckpt"
# What torch.load raises for a truncated, foreign or unsafe file.
_UNREADABLE = (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError)
# Config keys a resumed run may change: the step budget, where the run folder and the artifact go, and how
# often checkpoints and histograms are written, and the devices (a data-parallel meta-step is the one-process
# meta-step up to float reduction order). Anything else would make the artifact's record a history
# that did not happen.
RESUME_MAY_CHANGE = ("steps", "logdir", "output", "checkpoint_every", "histogram_every", "progress", "dist")


class _Ticker(IterableDataset):
    """An endless stream of dummy items: one per meta-step. The step's real data is planned from
    (seed, global_step) inside the module, so a resumed run replays it without a stateful sampler."""

    def __iter__(self) -> Iterator[int]:
        return itertools.repeat(0)


def load_meta_tasks(cfg: MetaTrainConfig) -> list[MetaTask]:
    """Every task of the family with ``num_train`` train and ``num_dev`` dev examples (the finetune loader)."""
    tasks = []
    for name in cfg.tasks:
        task, data = load_task_data(dataclasses.replace(cfg.data, task=name))
        tasks.append(MetaTask(task.name, task.loss_kind, data.train, data.dev))
    if len({t.name for t in tasks}) != len(tasks):
        raise L2ZOError(f"--tasks names a task twice: {cfg.tasks}")
    for t in tasks:
        # Refused rather than capped: plan_step would silently draw smaller batches than the config says.
        splits = [("training", len(t.train), "--num-train")]
        if cfg.outer_batch == "heldout":
            splits.append(("dev", len(t.dev), "--num-dev"))
        for split, n, flag in splits:
            if cfg.data.batch_size > n:
                raise L2ZOError(f"--batch-size {cfg.data.batch_size} is larger than the {n} {split} examples of task "
                                f"{t.name!r}; lower --batch-size or raise {flag}")  # fmt: skip
    return tasks


def feature_spec(cfg: MetaTrainConfig) -> FeatureSpec:
    """The net's feature options from the config (``--log-scale``, ``--normalize-features``, ``--feature-*``)."""
    return FeatureSpec(log_scale=cfg.log_scale, normalize=cfg.normalize_features, log_numel=cfg.feature_log_numel,
                       weight_norm=cfg.feature_weight_norm, drift=cfg.feature_drift, curvature=cfg.feature_curvature,
                       grad_rms=cfg.feature_grad_rms)  # fmt: skip


def build_net(cfg: MetaTrainConfig, blocks: list[Block], static: StaticCurvature | None = None) -> VarianceNet:
    """The fresh variance net; with ``--feature-curvature`` it holds the measured ``static`` curvature."""
    spec = NetSpec(hidden=cfg.hidden, activation=cfg.activation, positive=cfg.positive, features=feature_spec(cfg),
                   role_embedding_dim=cfg.role_embedding_dim, depth_feature=cfg.depth_feature, shared=cfg.shared,
                   kind_scale=cfg.kind_scale)  # fmt: skip
    net = VarianceNet(spec, [b.name for b in blocks], seed=cfg.net_seed)
    if spec.features.static_curvature:
        if static is None:
            raise L2ZOError("--feature-curvature needs the measured static curvature (measure_static_curvature)")
        net.static_curvature.copy_(static.feature)
    return net


def measure_static(cfg: MetaTrainConfig, model: Any, blocks: list[Block], tasks: list[MetaTask],
                   scorer: CandidateScorer) -> StaticCurvature | None:  # fmt: skip
    """The static curvature of the base model on the meta-training tasks, or None without ``--feature-curvature``."""
    if cfg.feature_curvature == "none":
        return None
    t0 = time.perf_counter()
    static = measure_static_curvature(
        model, blocks, [CurvatureTask(t.name, t.loss_kind, t.train) for t in tasks], scorer,
        kind=cfg.feature_curvature, batch_size=cfg.data.batch_size, pairs=cfg.feature_curvature_pairs, seed=cfg.seed,
    )  # fmt: skip
    log.info("static %s curvature measured on %d batch pairs in %.1fs", static.kind, static.pairs,
             time.perf_counter() - t0)  # fmt: skip
    return static


def check_resume(cfg: MetaTrainConfig, resume: str) -> None:
    """Refuse a checkpoint that cannot be read, that meta-train did not write, or whose config differs from
    ``cfg`` in anything but ``RESUME_MAY_CHANGE`` (naming the keys)."""
    path = Path(resume)
    if not path.is_file():
        raise L2ZOError(f"checkpoint to resume not found: {resume}")
    try:  # mmap: only the small records are read here; weights_only: nothing in the file is executed
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except _UNREADABLE as exc:  # a truncated zip, a foreign pickle, not a torch file at all
        why = one_line(exc).split(". ")[0]  # torch appends a paragraph of advice
        raise L2ZOError(f"cannot read the checkpoint {resume} ({why}): it is truncated or not a checkpoint; "
                        f"resume from another one in {path.parent}, or start again with --overwrite") from None  # fmt: skip
    extra = ckpt.get(STATE_KEY) if isinstance(ckpt, dict) else None
    if not isinstance(extra, dict):
        raise L2ZOError(f"{resume} was not written by `l2zo meta-train` (no meta-training state); pass its checkpoint")
    saved = extra.get("config")
    if saved is None:
        log.warning("%s records no config (an older l2zo wrote it): cannot check that the config is the same", resume)
    else:
        now = dataclasses.asdict(cfg)
        # A key the checkpoint lacks (an l2zo before it existed) was at its default then.
        defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}
        saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
        diff = [k for k in sorted(set(saved) | set(now)) if k not in RESUME_MAY_CHANGE and saved.get(k) != now.get(k)]
        if diff:
            shown = "; ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in diff)
            raise L2ZOError(f"--resume {resume}: the config differs from the checkpoint's ({shown}). A resumed run "
                            f"keeps its config (only {', '.join(RESUME_MAY_CHANGE)} may change): resume with "
                            f"--config {Path(saved.get('logdir', cfg.logdir)) / 'config.yaml'}")  # fmt: skip
    step = int(ckpt.get("global_step", 0))
    if step > cfg.steps:
        raise L2ZOError(f"--resume {resume} is at meta-step {step}, beyond --steps {cfg.steps}; raise --steps")


def check_inputs(cfg: MetaTrainConfig, resume: str | None, overwrite: bool) -> None:
    """Everything that can be refused before the run folder exists (a refusal leaves nothing behind)."""
    if cfg.dist.world_size > 1:
        if cfg.dist.strategy != "ddp":
            raise L2ZOError(f"meta-train runs on many processes data-parallel: use --strategy ddp, not "
                            f"{cfg.dist.strategy}")  # fmt: skip
        if cfg.differentiable_g:
            raise L2ZOError("--differentiable-g differentiates the probe's losses, which --strategy ddp sums over "
                            "the processes as values: use one of them")  # fmt: skip
        if cfg.data.batch_size < cfg.dist.world_size:
            raise L2ZOError(f"--batch-size ({cfg.data.batch_size}) must be at least the number of processes "
                            f"({cfg.dist.world_size}): each needs a slice of every batch")  # fmt: skip
    logdir = Path(cfg.logdir)
    if logdir.resolve().is_relative_to(SHIPPED_ROOT.resolve()):
        raise L2ZOError(f"--logdir {logdir} is inside {SHIPPED_ROOT}: run folders and checkpoints go under runs/")
    if Path(cfg.output).exists() and not overwrite:
        raise L2ZOError(f"artifact folder {cfg.output} already exists; pick another --output or pass --overwrite")
    check_device(cfg.data.device)
    check_writable_dir(logdir)
    check_writable_dir(Path(cfg.output).parent, "--output")
    if resume is not None:
        check_resume(cfg, resume)


def resume_command(cfg: MetaTrainConfig, ckpt: Path) -> str:
    """The command that continues this run from ``ckpt`` (the run folder's config.yaml is the resolved config)."""
    cmd = ["l2zo", "meta-train", "--config", str(Path(cfg.logdir) / "config.yaml"), "--resume", str(ckpt)]
    if Path(cfg.output).exists():
        cmd.append("--overwrite")
    return shlex.join(cmd)


def _quiet_lightning() -> None:
    # Both are expected here: the checkpoint is taken after the whole meta-step (net update and trajectory step),
    # and the base model's train/eval mode is set explicitly for every pass (eval for ZO and look-ahead forwards).
    warnings.filterwarnings("ignore", message=r".*no pre-optimization state was saved.*")
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    # A resumed run writes its checkpoints where the killed one did.
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")


def make_meta_trainer(cfg: MetaTrainConfig, logdir: Path, logger: TensorBoardLogger | bool = True,
                      callbacks: list[L.Callback] | None = None) -> L.Trainer:  # fmt: skip
    _quiet_lightning()
    ckpt = ModelCheckpoint(dirpath=logdir / CHECKPOINT_DIR, filename="{step}", every_n_train_steps=cfg.checkpoint_every,
                           save_top_k=1, save_last=True, save_on_train_epoch_end=False)  # fmt: skip
    if cfg.dist.world_size > 1:
        callbacks = [*(callbacks or []), ReplicaChecksum(cfg.dist.checksum_every)]
    trainer = L.Trainer(
        accelerator={"auto": "auto", "cpu": "cpu", "cuda": "gpu"}[cfg.data.device],
        devices=cfg.dist.devices,
        num_nodes=cfg.dist.num_nodes,
        strategy=make_strategy(cfg.dist),
        use_distributed_sampler=False,  # a ticker: each step's data is planned, then sliced per process
        precision=cfg.data.precision,  # "32" as the paper; bf16-mixed keeps fp32 master weights, net and losses
        max_steps=cfg.steps,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=logger,
        callbacks=[*(callbacks or []), ckpt],
        log_every_n_steps=1,
        enable_model_summary=False,
        enable_progress_bar=cfg.progress,
    )
    refuse_closureless_precision(trainer.precision_plugin)
    return trainer


def run_meta_train(cfg: MetaTrainConfig, *, resume: str | None = None, overwrite: bool = False) -> Path:
    """Meta-train (or resume from a Lightning checkpoint ``resume``) and write the artifact; returns its path."""
    quiet_libraries()
    # On many processes each runs this; rank 0 alone writes the run folder and the artifact.
    with signal_guard() as guard, replica_paths(cfg, "logdir", "output") as cfg:
        check_inputs(cfg, resume, overwrite)
        tasks = load_meta_tasks(cfg)
        loaded = load_model(cfg.data.model, attn_implementation=cfg.attn_implementation)
        if cfg.adapter.enabled:  # the blocks (and the artifact) are then the adapter's tensors
            loaded.model = apply_peft(loaded.model, cfg.adapter, seed=cfg.seed).model
        with locked_run_folder(cfg.logdir) as folder:
            if resume is None and holds_run(folder.path):
                if not overwrite:
                    last = folder.path / CHECKPOINT_DIR / LAST_CHECKPOINT
                    hint = f"resume it with --resume {last}, " if last.is_file() else ""
                    raise L2ZOError(
                        f"{folder.path} already holds a run; {hint}pick another --logdir or pass --overwrite"
                    )
                clear_run(folder.path)
            folder.started = True
            return _run(cfg, tasks, loaded, folder.path, guard, resume, overwrite)


def _run(cfg: MetaTrainConfig, tasks: list[MetaTask], loaded: Any, logdir: Path, guard: SignalGuard,
         resume: str | None, overwrite: bool) -> Path:  # fmt: skip
    summary: dict[str, Any] = {"status": RUNNING, "tasks": [t.name for t in tasks], "steps": cfg.steps,
                               "resumed_from": resume, "output": cfg.output}  # fmt: skip
    write_json_atomic(logdir / "summary.json", summary)  # "running" until it ends: a SIGKILL leaves it so
    last = logdir / CHECKPOINT_DIR / LAST_CHECKPOINT
    trainer: L.Trainer | None = None
    try:
        L.seed_everything(cfg.seed, workers=False, verbose=False)
        blocks = partition(loaded.model)
        scorer = CandidateScorer(loaded.tokenizer, cfg.data.max_length)
        static = measure_static(cfg, loaded.model, blocks, tasks, scorer)  # on the pretrained weights
        module = MetaTrainModule(loaded.model, build_net(cfg, blocks, static), scorer, tasks, cfg)
        write_yaml_atomic(logdir / "config.yaml", config_to_dict(cfg))
        logger = TensorBoardLogger(save_dir=str(logdir), name="", version="", default_hp_metric=False)
        # On a signal: finish the meta-step, then save it (the same point in the step as the periodic checkpoints).
        stop = StopOnSignal(guard, on_interrupt=lambda trainer: trainer.save_checkpoint(last))
        trainer = make_meta_trainer(cfg, logdir, logger, callbacks=[stop])
        with trainer_call(guard):
            trainer.fit(module, train_dataloaders=DataLoader(_Ticker(), batch_size=None), ckpt_path=resume)
            trainer.save_checkpoint(last)  # the final state: a resume from it only writes the artifact
        path, record = _write_artifact(cfg, module, loaded, tasks, int(trainer.global_step), resume, overwrite, static)
    except BaseException as exc:
        record_end(summary, exc)
        summary.update(steps_done=int(trainer.global_step) if trainer is not None else 0, artifact=None,
                       checkpoint=str(last) if last.is_file() else None)  # fmt: skip
        if isinstance(exc, RunInterrupted):
            summary["resume_command"] = resume_command(cfg, last) if last.is_file() else None
            how = (f"checkpoint {last} is at meta-step {_ckpt_step(last)}; resume with: {summary['resume_command']}"
                   if last.is_file() else "no checkpoint was saved yet; start again")  # fmt: skip
            exc.detail = f"meta-train stopped without an artifact; {how}"
        write_json_atomic(logdir / "summary.json", summary)
        raise
    summary.update(record, artifact=str(path), checkpoint=str(last), meta_loss_history=module.history)
    record_end(summary, None)
    write_json_atomic(logdir / "summary.json", summary)
    return path


def _ckpt_step(path: Path) -> int | str:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step", 0))
    except _UNREADABLE:  # only for a message
        return "?"


def _write_artifact(cfg: MetaTrainConfig, module: MetaTrainModule, loaded: Any, tasks: list[MetaTask], steps: int,
                    resume: str | None, overwrite: bool,
                    static: StaticCurvature | None = None) -> tuple[Path, dict[str, Any]]:  # fmt: skip
    sigma = module.final_sigma()  # at the final trajectory state, averaged over the tasks
    module.pretrained.restore_(module.blocks)  # the artifact records the base model's weight stats
    record: dict[str, Any] = {
        "tasks": [t.name for t in tasks],
        "task_weights": cfg.task_weights,
        "steps": steps,
        "seed": cfg.seed,
        "objective": cfg.objective_name,
        "trajectory": {"p_teacher": cfg.p_teacher, "teacher_lr": cfg.teacher_lr, "reset_every": cfg.reset_every},
        "inner_lr": cfg.inner_lr,
        "meta_optimizer": cfg.meta_optimizer,
        "meta_lr": cfg.meta_lr,
        "initial_meta_loss": _mean([v for _, _, v in module.history[:50]]),
        "final_meta_loss": module.final_meta_loss(),
        "wall_time_s": module.wall_time_s,
        "resumed_from": resume,
    }
    if static is not None:
        record["static_curvature"] = static.record()
    path = save_artifact(
        cfg.output, module.net, module.blocks,
        base_model={"name": cfg.data.model, "revision": loaded.revision, "name_or_path": loaded.name_or_path,
                    **_adapter_key(loaded.model)},
        meta_config=config_to_dict(cfg), meta_record=record,
        normalization={"rule": cfg.normalization, "batch_size": cfg.data.batch_size},
        sigma=sigma, model=loaded.model, overwrite=overwrite,
    )  # fmt: skip
    return path, record


def _adapter_key(model: Any) -> dict[str, Any]:
    """``{"adapter": record}`` for a model with a PEFT adapter (``l2zo.models.adapters``), else nothing."""
    record = getattr(model, "l2zo_adapter", None)
    return {"adapter": record} if record else {}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
