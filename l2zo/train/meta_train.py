"""``run_meta_train``: load the model and the task family, meta-train the variance net, save the artifact.

The run folder (``cfg.logdir``, under runs/) receives the TensorBoard events, the resolved config.yaml,
resumable Lightning checkpoints (checkpoints/last.ckpt) and summary.json. The artifact goes to ``cfg.output``
(e.g. checkpoints/tiny/<name>), written atomically by ``save_artifact`` once training is done.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, IterableDataset

from l2zo.config import config_to_dict
from l2zo.engine import Block, partition
from l2zo.errors import L2ZOError
from l2zo.learned.artifact import save_artifact
from l2zo.learned.features import FeatureSpec
from l2zo.learned.meta_config import MetaTrainConfig
from l2zo.learned.net import NetSpec, VarianceNet
from l2zo.models import load_model
from l2zo.models.tiny import SHIPPED_ROOT
from l2zo.tasks.loading import load_task_data
from l2zo.tasks.scoring import CandidateScorer
from l2zo.train.logs import quiet_libraries
from l2zo.train.meta_module import MetaTask, MetaTrainModule
from l2zo.utils.io import write_json_atomic, write_yaml_atomic

log = logging.getLogger("l2zo")

CHECKPOINT_DIR = "checkpoints"  # inside the run folder


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
    return tasks


def build_net(cfg: MetaTrainConfig, blocks: list[Block]) -> VarianceNet:
    spec = NetSpec(hidden=cfg.hidden, activation=cfg.activation, positive=cfg.positive,
                   features=FeatureSpec(log_scale=cfg.log_scale, normalize=cfg.normalize_features),
                   role_embedding_dim=cfg.role_embedding_dim, depth_feature=cfg.depth_feature, shared=cfg.shared)  # fmt: skip
    return VarianceNet(spec, [b.name for b in blocks], seed=cfg.net_seed)


def _prepare_run(cfg: MetaTrainConfig, resume: str | None, overwrite: bool) -> Path:
    logdir = Path(cfg.logdir)
    if logdir.resolve().is_relative_to(SHIPPED_ROOT.resolve()):
        raise L2ZOError(f"--logdir {logdir} is inside {SHIPPED_ROOT}: run folders and checkpoints go under runs/")
    if Path(cfg.output).exists() and not overwrite:
        raise L2ZOError(f"artifact folder {cfg.output} already exists; pick another --output or pass --overwrite")
    if resume is None:
        old = list(logdir.glob("events.out.tfevents.*")) + list((logdir / CHECKPOINT_DIR).glob("*.ckpt"))
        if old and not overwrite:
            raise L2ZOError(f"{logdir} already holds a run; resume it with --resume {logdir / CHECKPOINT_DIR / 'last.ckpt'}, "
                            "or pass --overwrite")  # fmt: skip
        for f in old:
            f.unlink()
    elif not Path(resume).is_file():
        raise L2ZOError(f"checkpoint to resume not found: {resume}")
    logdir.mkdir(parents=True, exist_ok=True)
    return logdir


def _quiet_lightning() -> None:
    # Both are expected here: the checkpoint is taken after the whole meta-step (net update and trajectory step),
    # and the base model's train/eval mode is set explicitly for every pass (eval for ZO and look-ahead forwards).
    warnings.filterwarnings("ignore", message=r".*no pre-optimization state was saved.*")
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


def make_meta_trainer(cfg: MetaTrainConfig, logdir: Path, logger: TensorBoardLogger | bool = True) -> L.Trainer:
    _quiet_lightning()
    ckpt = ModelCheckpoint(dirpath=logdir / CHECKPOINT_DIR, filename="{step}", every_n_train_steps=cfg.checkpoint_every,
                           save_top_k=1, save_last=True, save_on_train_epoch_end=False)  # fmt: skip
    return L.Trainer(
        accelerator={"auto": "auto", "cpu": "cpu", "cuda": "gpu"}[cfg.data.device],
        devices=1,
        precision=cfg.data.precision,  # "32" as the paper; bf16-mixed keeps fp32 master weights, net and losses
        max_steps=cfg.steps,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=logger,
        callbacks=[ckpt],
        log_every_n_steps=1,
        enable_model_summary=False,
        enable_progress_bar=cfg.progress,
    )


def run_meta_train(cfg: MetaTrainConfig, *, resume: str | None = None, overwrite: bool = False) -> Path:
    """Meta-train (or resume from a Lightning checkpoint ``resume``) and write the artifact; returns its path."""
    quiet_libraries()
    logdir = _prepare_run(cfg, resume, overwrite)
    tasks = load_meta_tasks(cfg)
    loaded = load_model(cfg.data.model, attn_implementation=cfg.attn_implementation)
    L.seed_everything(cfg.seed, workers=False, verbose=False)
    blocks = partition(loaded.model)
    module = MetaTrainModule(loaded.model, build_net(cfg, blocks), CandidateScorer(loaded.tokenizer, cfg.data.max_length), tasks, cfg)
    write_yaml_atomic(logdir / "config.yaml", config_to_dict(cfg))
    logger = TensorBoardLogger(save_dir=str(logdir), name="", version="", default_hp_metric=False)
    trainer = make_meta_trainer(cfg, logdir, logger)
    trainer.fit(module, train_dataloaders=DataLoader(_Ticker(), batch_size=None), ckpt_path=resume)

    sigma = module.final_sigma()  # at the final trajectory state, averaged over the tasks
    module.pretrained.restore_(module.blocks)  # the artifact records the base model's weight stats
    record: dict[str, Any] = {
        "tasks": [t.name for t in tasks],
        "task_weights": cfg.task_weights,
        "steps": int(trainer.global_step),
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
    path = save_artifact(
        cfg.output, module.net, module.blocks,
        base_model={"name": cfg.data.model, "revision": loaded.revision, "name_or_path": loaded.name_or_path},
        meta_config=config_to_dict(cfg), meta_record=record,
        normalization={"rule": cfg.normalization, "batch_size": cfg.data.batch_size},
        sigma=sigma, model=loaded.model, overwrite=overwrite,
    )  # fmt: skip
    write_json_atomic(logdir / "summary.json", {**record, "artifact": str(path), "meta_loss_history": module.history})
    return path


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
