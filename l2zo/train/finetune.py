"""``run_finetune``: load a model and a task, fine-tune with any registered optimizer, evaluate, report.

The run folder (``cfg.logdir``) receives the TensorBoard events, the resolved ``config.yaml``,
``summary.json`` (strict JSON, written atomically: ``running`` at the start, then how the run ended) and, while
the run is not finished, a resumable checkpoint ``checkpoints/last.ckpt`` (every ``--checkpoint-every`` steps and
on SIGTERM/SIGINT: see ``l2zo.train.checkpoints``).

``resume=True`` continues the run in ``cfg.logdir`` from that checkpoint: parameters, optimizer state (the ZO
step count and seed, momentum, moments ...), lr schedule, step, data order (``SeededBatches`` starts at the
restored step), global RNG, and the dev history, step times and batch digests, so that the result equals, bit
for bit, a run that was never stopped. What is checked first: ``l2zo.train.resume``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from l2zo.config import FinetuneConfig, ZArgs, config_to_dict
from l2zo.errors import L2ZOError
from l2zo.learned.artifact import artifact_digest
from l2zo.models import load_model
from l2zo.models.adapters import AdaptedModel, apply_peft
from l2zo.models.loading import LoadedModel, check_device
from l2zo.optim.base import ZOOptimizer
from l2zo.optim.registry import OptimizerSpec, build_optimizer, get_optimizer_spec
from l2zo.optim.run_hparams import optimizer_hparams
from l2zo.optim.z_options import apply_z_args
from l2zo.tasks.base import TaskData
from l2zo.tasks.loading import load_task_data
from l2zo.tasks.scoring import CandidateScorer
from l2zo.train.checkpoints import AtomicCheckpointIO, StepCheckpoints, last_checkpoint
from l2zo.train.data import TaskDataModule
from l2zo.train.eval_report import EvalReport, evaluations_planned
from l2zo.train.lifecycle import FailOnNonFiniteLoss, trainer_call
from l2zo.train.logs import quiet_libraries
from l2zo.train.module import FinetuneModule
from l2zo.train.replicas import ReplicaChecksum
from l2zo.train.resume import RUN_KEY, ResumePoint, check_resume, resume_command
from l2zo.train.sharded import check_shardable, make_device_map_strategy, whole_state_dict
from l2zo.train.strategies import make_strategy, refuse_closureless_precision, replica_paths
from l2zo.utils.io import atomic_dir, write_json_atomic, write_yaml_atomic
from l2zo.utils.memory import peak_memory_mb
from l2zo.utils.rundir import check_writable_dir, clear_run, holds_run, locked_run_folder
from l2zo.utils.runstatus import RUNNING, RunInterrupted, SignalGuard, record_end, signal_guard

log = logging.getLogger("l2zo")


def eval_interval(cfg: FinetuneConfig) -> int:
    """Steps between the dev evaluations inside ``fit`` (the trainer's ``val_check_interval``)."""
    return min(cfg.eval_every, cfg.steps)


def make_trainer(
    cfg: FinetuneConfig, logger: TensorBoardLogger | bool, callbacks: list[L.Callback] | None = None
) -> L.Trainer:
    accelerator = {"auto": "auto", "cpu": "cpu", "cuda": "gpu"}[cfg.data.device]
    if cfg.dist.world_size > 1 and cfg.dist.strategy == "ddp":  # replicas (sharded runs hold different slices)
        callbacks = [*(callbacks or []), ReplicaChecksum(cfg.dist.checksum_every)]
    trainer = L.Trainer(
        callbacks=callbacks,
        accelerator=accelerator,
        devices=1 if cfg.data.device_map else cfg.dist.devices,
        num_nodes=cfg.dist.num_nodes,
        strategy=make_device_map_strategy() if cfg.data.device_map else make_strategy(cfg.dist),
        use_distributed_sampler=False,  # SeededBatches and the eval loaders slice the data per process themselves
        precision=cfg.data.precision,
        max_steps=cfg.steps,
        max_epochs=-1,
        val_check_interval=eval_interval(cfg),
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,  # l2zo's own StepCheckpoints, written by AtomicCheckpointIO
        plugins=[AtomicCheckpointIO()],
        enable_model_summary=False,
        enable_progress_bar=cfg.progress,
        deterministic=False,
    )
    refuse_closureless_precision(trainer.precision_plugin)
    return trainer


def _digests(module: FinetuneModule) -> dict[str, Any]:
    """The training batch sequence's digest: equal across runs exactly when they saw the same batches in order."""
    return {"batch_digest": module.batch_digest, "batch_digests_head": list(module.batch_digests_head)}


def _with_z_source(opt: torch.optim.Optimizer, zo: ZArgs) -> torch.optim.Optimizer:
    """--z-source, --cache-z and --two-pass on the run's optimizer (``apply_z_args``); what it ignores is logged."""
    for note in apply_z_args(opt, zo):
        log.info(note)
    return opt


def check_inputs(cfg: FinetuneConfig, data: TaskData) -> None:
    """What can be refused before a model is loaded: the device, the batch size, the run folder."""
    check_device(cfg.data.device)
    world = cfg.dist.world_size
    if world > 1:
        for what, n in (("--batch-size", cfg.data.batch_size), ("dev examples", len(data.dev)),
                        ("test examples", len(data.test))):  # fmt: skip
            if n < world:  # a process with nothing to evaluate would leave the others waiting for its sums
                raise L2ZOError(f"{what} ({n}) must be at least the number of processes ({world}: --devices "
                                f"{cfg.dist.devices} x --num-nodes {cfg.dist.num_nodes}): each needs a "
                                "slice")  # fmt: skip
    if cfg.data.device_map and cfg.data.device == "cpu":
        raise L2ZOError("--device-map auto spreads the model over GPUs and --device cpu keeps it on the host: "
                        "drop one of them")  # fmt: skip
    if cfg.data.batch_size > len(data.train):
        # Refused rather than capped: a capped batch would make summary.json report a batch size that never ran.
        raise L2ZOError(f"--batch-size {cfg.data.batch_size} is larger than the {len(data.train)} training examples; "
                        "lower --batch-size or raise --num-train")  # fmt: skip
    check_writable_dir(cfg.logdir)


def check_distributed(cfg: FinetuneConfig, opt: torch.optim.Optimizer, resume: bool) -> None:
    """What the strategy refuses, before the run folder exists: under --strategy fsdp an optimizer whose step a
    row shard cannot compute alone (``check_shardable``); on several data-parallel processes an optimizer that
    needs gradients (data-parallel ZO sums loss values, nothing else), and --resume (for now; the checkpoint is
    written and holds the whole run)."""
    if cfg.dist.strategy == "fsdp":
        check_shardable(opt)  # the strategy checks again when Lightning hands it the optimizers
    if cfg.dist.world_size == 1 or cfg.dist.strategy != "ddp":
        return
    if not (isinstance(opt, ZOOptimizer) and opt.data_parallel):
        raise L2ZOError(f"--strategy ddp sums loss values over the processes; {cfg.optimizer} needs gradients of the "
                        "loss: run it with --devices 1")  # fmt: skip
    if resume:
        raise L2ZOError("--resume runs on one process for now: resume with --devices 1 --num-nodes 1 --strategy auto "
                        "(the checkpoint holds the whole run)")  # fmt: skip


def run_finetune(cfg: FinetuneConfig, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    """Fine-tune, evaluate on dev during training and on test at the end; return the summary.

    Everything the user gave is checked before the run folder exists (a refusal leaves nothing behind);
    from then on the folder is locked, and every ending is recorded in summary.json (``l2zo.utils.runstatus``):
    a failed run raises ``L2ZOError``, a signal ``RunInterrupted``, after writing it. ``resume``: continue the
    run in ``cfg.logdir`` from its checkpoint (see the module doc). On several processes each runs this, and
    only rank 0 writes the run folder (``replica_paths``).
    """
    quiet_libraries()
    with signal_guard() as guard, replica_paths(cfg, "logdir") as cfg:
        if resume and overwrite:
            raise L2ZOError("--resume continues the run in --logdir and --overwrite replaces it: pass one of them")
        if resume and not holds_run(cfg.logdir):
            raise L2ZOError(f"--resume: there is no run in {cfg.logdir} to resume; check --logdir")
        spec = get_optimizer_spec(cfg.optimizer)
        hp = optimizer_hparams(cfg, spec)
        task, data = load_task_data(cfg.data)
        check_inputs(cfg, data)
        loaded = load_model(cfg.data.model, device_map=cfg.data.device_map)
        adapted = with_adapter(loaded, cfg)
        # Built once here, discarded: a bad hyperparameter value or an artifact that does not fit the model is
        # refused before the run folder exists. Constructors draw no random numbers and allocate no state.
        check_distributed(cfg, build_optimizer(cfg.optimizer, loaded.model, **hp), resume)
        with locked_run_folder(cfg.logdir) as folder:
            start = check_resume(cfg, folder.path) if resume else None
            if start is None and holds_run(folder.path):
                if not overwrite:
                    hint = "resume it with --resume, " if last_checkpoint(folder.path).is_file() else ""
                    raise L2ZOError(
                        f"{folder.path} already holds a run; {hint}pick another --logdir or pass --overwrite"
                    )
                clear_run(folder.path)
            folder.started = True
            return _run(cfg, spec, hp, task, data, loaded, adapted, folder.path, guard, start)


def with_adapter(loaded: LoadedModel, cfg: FinetuneConfig) -> AdaptedModel | None:
    """``--peft``: wrap the loaded model with the adapter (initialised from the run seed) and train that; the
    loaded model's ``model`` becomes what the optimizer and the scorer run. None without ``--peft``."""
    if not cfg.adapter.enabled:
        return None
    adapted = apply_peft(loaded.model, cfg.adapter, seed=cfg.seed)
    loaded.model = adapted.model
    n_train = sum(p.numel() for p in adapted.model.parameters() if p.requires_grad)
    log.info("%s: %d trainable parameters", cfg.adapter.describe(), n_train)
    return adapted


def _run(cfg: FinetuneConfig, spec: OptimizerSpec, hp: dict[str, Any], task: Any, data: TaskData, loaded: Any,
         adapted: AdaptedModel | None, logdir: Path, guard: SignalGuard,
         start: ResumePoint | None) -> dict[str, Any]:  # fmt: skip
    summary: dict[str, Any] = {
        "status": RUNNING,
        "model": cfg.data.model,
        "model_name_or_path": loaded.name_or_path,
        "model_revision": loaded.revision,
        "task": task.name,
        "data_source": data.source,
        "data_notes": data.notes,
        "split_sizes": {"train": len(data.train), "dev": len(data.dev), "test": len(data.test)},
        "optimizer": cfg.optimizer,
        "peft": None if adapted is None else adapted.record,
        "hparams": {k: v for k, v in {**spec.defaults, **hp}.items()},
        "artifact_sha256": artifact_digest(hp.get("artifact")),  # the net that ran, whatever its path holds later
        "steps": cfg.steps,
        "batch_size": cfg.data.batch_size,
        "seed": cfg.seed,
        "precision": cfg.data.precision,
        "processes": cfg.dist.world_size,
        "strategy": cfg.dist.strategy,
        "forwards_per_step": spec.forwards_per_step,
        "resumed_from_step": None if start is None else start.step,
    }
    write_json_atomic(logdir / "summary.json", summary)  # "running" until it ends: a SIGKILL leaves it so
    last = last_checkpoint(logdir)
    module: FinetuneModule | None = None
    trainer: L.Trainer | None = None
    checkpoints: StepCheckpoints | None = None
    try:
        L.seed_everything(cfg.seed, workers=False, verbose=False)
        scorer = CandidateScorer(loaded.tokenizer, max_length=cfg.data.max_length)
        module = FinetuneModule(
            model=loaded.model,
            scorer=scorer,
            loss_kind=task.loss_kind,
            build_optimizer=lambda model: _with_z_source(build_optimizer(cfg.optimizer, model, **hp), cfg.zo),
            zeroth_order=spec.zeroth_order,
            forwards_per_step=spec.forwards_per_step,
            lr_schedule=cfg.lr_schedule,
            total_steps=cfg.steps,
            needs_anchor_batch=spec.needs_anchor_batch,
        )
        dm = TaskDataModule(data, scorer, cfg.data.batch_size, cfg.data.eval_batch_size, cfg.seed)
        write_yaml_atomic(logdir / "config.yaml", config_to_dict(cfg))  # a resumed run's (its --steps) too
        logger = TensorBoardLogger(save_dir=str(logdir), name="", version="", default_hp_metric=False)
        every = eval_interval(cfg)
        evals = evaluations_planned(cfg.steps, every) if start is None else _evals_left(cfg.steps, every, start.step)
        report = EvalReport(data.dev, data.test, dev_evals=evals, max_length=cfg.data.max_length,
                            batch_size=cfg.data.eval_batch_size)  # fmt: skip
        prior_s = 0.0 if start is None else start.wall_time_s
        t_start = time.perf_counter()
        checkpoints = StepCheckpoints(
            guard, last, every=cfg.checkpoint_every, eval_every=every, key=RUN_KEY,
            record=lambda: {"config": config_to_dict(cfg), "wall_time_s": prior_s + time.perf_counter() - t_start},
            saved_step=None if start is None else start.step,
        )  # fmt: skip
        trainer = make_trainer(cfg, logger, [FailOnNonFiniteLoss(), checkpoints, report])
        with trainer_call(guard):
            if start is None:  # a resumed run has its step-0 evaluation in the restored history
                trainer.validate(module, datamodule=dm, verbose=False)
            trainer.fit(module, datamodule=dm, ckpt_path=None if start is None else start.checkpoint)
            checkpoints.after_fit(trainer)
            if module.history["val/loss"][-1][0] != trainer.global_step:
                trainer.validate(module, datamodule=dm, verbose=False)
            trainer.test(module, datamodule=dm, verbose=False)
        summary.update(_results(module, trainer, loaded, prior_s + time.perf_counter() - t_start))
        diverged = _non_finite(summary)
        if diverged:
            raise L2ZOError(f"the run diverged: {diverged}; lower --lr (or --eps)")
        if cfg.save_model:
            with atomic_dir(logdir / "model", overwrite=True) as tmp:
                if adapted is None:
                    loaded.model.save_pretrained(tmp, state_dict=whole_state_dict(loaded.model))  # fsdp: gathered
                else:  # the adapter only: PeftModel.from_pretrained(base model, LOGDIR/model) loads it
                    adapted.save(tmp)
                loaded.tokenizer.save_pretrained(tmp)
            summary["model_saved_to"] = str(logdir / "model")
    except BaseException as exc:
        summary.setdefault("steps_done", int(trainer.global_step) if trainer is not None else 0)
        if module is not None:
            summary.update(_digests(module))
        record_end(summary, exc)
        ckpt_step = None
        if last.is_file():
            ckpt_step = checkpoints.saved_step if checkpoints is not None else None if start is None else start.step
        summary.update(checkpoint=str(last) if ckpt_step is not None else None, checkpoint_step=ckpt_step)
        if isinstance(exc, RunInterrupted):
            summary["resume_command"] = resume_command(cfg) if ckpt_step is not None else None
            how = (f"checkpoint {last} is at step {ckpt_step}; resume with: {summary['resume_command']}"
                   if ckpt_step is not None else "no checkpoint was saved; start again with --overwrite")  # fmt: skip
            exc.detail = (f"stopped at step {summary['steps_done']} of {cfg.steps}; {how} ({logdir / 'summary.json'} "
                          f"records status '{summary['status']}')")  # fmt: skip
        write_json_atomic(logdir / "summary.json", summary)
        raise
    record_end(summary, None)
    write_json_atomic(logdir / "summary.json", summary)
    # A finished run cannot be resumed: its checkpoint (as large as the model) goes; --save-model keeps the weights.
    last.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        last.parent.rmdir()
    return summary


def _evals_left(steps: int, every: int, start: int) -> int:
    """Dev evaluations still to run after a checkpoint at ``start``: the grid points above it, and the final one."""
    return steps // every - start // every + (1 if steps % every else 0)


def _results(module: FinetuneModule, trainer: L.Trainer, loaded: Any, wall_time_s: float) -> dict[str, Any]:
    dev = module.history["val/loss"]
    finite = [sv for sv in dev if math.isfinite(sv[1])] or dev
    best_step, best_loss = min(finite, key=lambda sv: sv[1])
    return dict(
        steps_done=int(trainer.global_step),
        wall_time_s=wall_time_s,
        time_per_step_s=statistics.median(module.step_times) if module.step_times else None,
        peak_mem_mb=peak_memory_mb(next(loaded.model.parameters()).device),
        dev_loss_initial=dev[0][1],
        dev_loss_final=dev[-1][1],
        dev_acc_initial=module.history["val/acc"][0][1],
        dev_acc_final=module.history["val/acc"][-1][1],
        dev_loss_best=best_loss,
        dev_loss_best_step=best_step,
        dev_history=[{"step": s, "loss": loss, "acc": a} for (s, loss), (_, a) in zip(dev, module.history["val/acc"])],
        test_loss=module.test_metrics.get("test/loss"),
        test_acc=module.test_metrics.get("test/acc"),
        **_digests(module),
    )


def _non_finite(summary: dict[str, Any]) -> str | None:
    """Why the finished run counts as diverged (a non-finite dev or test loss), else None.

    ZO optimizers stop at a non-finite training loss themselves; a first-order one steps on into NaN weights.
    """
    for h in summary["dev_history"]:
        if not math.isfinite(h["loss"]):
            return f"dev loss {h['loss']} at step {h['step']}"
    test = summary.get("test_loss")
    if test is not None and not math.isfinite(test):
        return f"test loss {test}"
    return None
