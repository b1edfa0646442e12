"""``run_finetune``: load a model and a task, fine-tune with any registered optimizer, evaluate, report.

The run folder (``cfg.logdir``) receives the TensorBoard events, the resolved ``config.yaml`` and
``summary.json`` (written atomically; also on failure, with the reason).
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from l2zo.config import FinetuneConfig, config_to_dict
from l2zo.errors import L2ZOError
from l2zo.models import load_model
from l2zo.optim.base import ZOOptimizer
from l2zo.optim.run_hparams import optimizer_hparams
from l2zo.optim.registry import build_optimizer, get_optimizer_spec
from l2zo.tasks.loading import load_task_data
from l2zo.tasks.scoring import CandidateScorer
from l2zo.train.data import TaskDataModule
from l2zo.train.logs import quiet_libraries
from l2zo.train.module import FinetuneModule
from l2zo.utils.io import atomic_dir, write_json_atomic, write_yaml_atomic
from l2zo.utils.memory import peak_memory_mb

log = logging.getLogger("l2zo")

_RUN_FILES = ("summary.json", "config.yaml", "hparams.yaml")


def _prepare_logdir(logdir: Path, overwrite: bool) -> None:
    old = list(logdir.glob("events.out.tfevents.*")) + [logdir / f for f in _RUN_FILES if (logdir / f).exists()]
    if old and not overwrite:
        raise L2ZOError(f"{logdir} already holds a run; pick another --logdir or pass --overwrite")
    for f in old:
        f.unlink()
    logdir.mkdir(parents=True, exist_ok=True)


def make_trainer(cfg: FinetuneConfig, logger: TensorBoardLogger | bool) -> L.Trainer:
    accelerator = {"auto": "auto", "cpu": "cpu", "cuda": "gpu"}[cfg.data.device]
    return L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=cfg.data.precision,
        max_steps=cfg.steps,
        max_epochs=-1,
        val_check_interval=min(cfg.eval_every, cfg.steps),
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=cfg.progress,
        deterministic=False,
    )


def _digests(module: FinetuneModule) -> dict[str, Any]:
    """The training batch sequence's digest: equal across runs exactly when they saw the same batches in order."""
    return {"batch_digest": module.batch_digest, "batch_digests_head": list(module.batch_digests_head)}


def _with_z_source(opt: torch.optim.Optimizer, cache_z: bool) -> torch.optim.Optimizer:
    """--cache-z: the step's z is drawn once and kept (bit-identical parameters; see ZOOptimizer.set_z_source)."""
    if cache_z and isinstance(opt, ZOOptimizer):
        opt.set_z_source(cache=True)
    elif cache_z:  # e.g. fo-adam in a compare that caches z for the ZO runs
        log.info("--cache-z ignored: %s does not regenerate z", type(opt).__name__)
    return opt


def run_finetune(cfg: FinetuneConfig, overwrite: bool = False) -> dict[str, Any]:
    """Fine-tune, evaluate on dev during training and on test at the end; return the summary."""
    quiet_libraries()
    spec = get_optimizer_spec(cfg.optimizer)
    hp = optimizer_hparams(cfg, spec)
    task, data = load_task_data(cfg.data)
    logdir = Path(cfg.logdir)
    _prepare_logdir(logdir, overwrite)
    loaded = load_model(cfg.data.model)
    L.seed_everything(cfg.seed, workers=False, verbose=False)
    scorer = CandidateScorer(loaded.tokenizer, max_length=cfg.data.max_length)
    module = FinetuneModule(
        model=loaded.model,
        scorer=scorer,
        loss_kind=task.loss_kind,
        build_optimizer=lambda model: _with_z_source(build_optimizer(cfg.optimizer, model, **hp), cfg.cache_z),
        zeroth_order=spec.zeroth_order,
        forwards_per_step=spec.forwards_per_step,
        lr_schedule=cfg.lr_schedule,
        total_steps=cfg.steps,
        needs_anchor_batch=spec.needs_anchor_batch,
    )
    dm = TaskDataModule(data, scorer, cfg.data.batch_size, cfg.data.eval_batch_size, cfg.seed)
    write_yaml_atomic(logdir / "config.yaml", config_to_dict(cfg))
    logger = TensorBoardLogger(save_dir=str(logdir), name="", version="", default_hp_metric=False)
    trainer = make_trainer(cfg, logger)
    summary: dict[str, Any] = {
        "status": "running",
        "model": cfg.data.model,
        "model_name_or_path": loaded.name_or_path,
        "model_revision": loaded.revision,
        "task": task.name,
        "data_source": data.source,
        "data_notes": data.notes,
        "split_sizes": {"train": len(data.train), "dev": len(data.dev), "test": len(data.test)},
        "optimizer": cfg.optimizer,
        "hparams": {k: v for k, v in {**spec.defaults, **hp}.items()},
        "steps": cfg.steps,
        "batch_size": cfg.data.batch_size,
        "seed": cfg.seed,
        "precision": cfg.data.precision,
        "forwards_per_step": spec.forwards_per_step,
    }
    t_start = time.perf_counter()
    try:
        trainer.validate(module, datamodule=dm, verbose=False)
        trainer.fit(module, datamodule=dm)
        if module.history["val/loss"][-1][0] != trainer.global_step:
            trainer.validate(module, datamodule=dm, verbose=False)
        trainer.test(module, datamodule=dm, verbose=False)
    except L2ZOError as exc:
        summary.update(status="failed", error=str(exc), steps_done=int(trainer.global_step), **_digests(module))
        write_json_atomic(logdir / "summary.json", summary)
        raise
    dev = module.history["val/loss"]
    best_step, best_loss = min(dev, key=lambda sv: sv[1])
    summary.update(
        status="ok",
        steps_done=int(trainer.global_step),
        wall_time_s=time.perf_counter() - t_start,
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
    if cfg.save_model:
        with atomic_dir(logdir / "model", overwrite=True) as tmp:
            loaded.model.save_pretrained(tmp)
            loaded.tokenizer.save_pretrained(tmp)
        summary["model_saved_to"] = str(logdir / "model")
    write_json_atomic(logdir / "summary.json", summary)
    return summary

