"""``MetaTrainModule``: the Lightning shell of meta-training; the algorithm lives in ``l2zo.learned.meta``.

One meta-step (``training_step``), in this order:

1. plan: task, inner/outer batches, z seeds and trajectory source, a pure function of (seed, step);
2. meta-objective at the current trajectory state theta (greedy look-ahead, K-step unrolled, or ES);
3. backward into the variance net only, and one step of the net's optimizer (the only Lightning optimizer);
4. the task's recurrent state takes the probe's (L+, L-) and the raw sigma;
5. the trajectory advances, explicitly and separately: a first-order teacher step or an on-policy ZO step;
6. every ``reset_every`` steps theta goes back to the pretrained weights and the teacher restarts.

Manual optimization, because step 5 changes theta in place and must come after the backward of step 3
(the look-ahead graph holds views of theta). The base model is a submodule, so theta is in the checkpoint's
state_dict; the teacher, the per-task states and the meta-loss record go through on_save/on_load_checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from l2zo.engine import ZSource, partition
from l2zo.errors import L2ZOError
from l2zo.learned.es import ESConfig, ESResult, es_meta_loss
from l2zo.learned.meta import (
    LossFn,
    MetaResult,
    SigmaNorm,
    TaskState,
    greedy_meta_loss,
    group_by_kind,
    plan_step,
    predict_sigma,
    unrolled_meta_loss,
)
from l2zo.learned.meta_config import MetaTrainConfig
from l2zo.learned.net import VarianceNet
from l2zo.learned.normalization import block_weights
from l2zo.learned.trajectory import PretrainedCopy, make_teacher, on_policy_step, teacher_lr, teacher_step
from l2zo.tasks.base import Example
from l2zo.tasks.scoring import CandidateScorer

STATE_KEY = "l2zo_meta"


@dataclass
class MetaTask:
    """One member of the task family: its examples and loss kind (``Task.loss_kind``)."""

    name: str
    loss_kind: str
    train: list[Example]
    dev: list[Example]


class MetaTrainModule(L.LightningModule):
    """Meta-train ``net`` on trajectories of ``model`` over the task family ``tasks``.

    Logged: meta/loss, meta/loss/<task>, train/loss/<task> (the trajectory's loss at theta), meta/c,
    meta/grad_norm, meta/sigma_mean, meta/lookahead_gain (L(theta) - L(theta'), greedy on the inner batch),
    meta/teacher (1 for a teacher step), meta/wall_time_s; histograms sigma/<block kind> and meta/sigma.
    With ``objective: es`` meta/loss is the mean of -R over the ES runs, and meta/es_reward, meta/es_reward_spread
    (mean |R+ - R-|), meta/es_dev_loss and meta/es_grad_norm are logged too (``l2zo.learned.es``).
    """

    def __init__(self, model: nn.Module, net: VarianceNet, scorer: CandidateScorer, tasks: Sequence[MetaTask],
                 cfg: MetaTrainConfig) -> None:  # fmt: skip
        super().__init__()
        self.model = model
        self.net = net
        self.scorer = scorer
        self.tasks = list(tasks)
        self.cfg = cfg
        self.automatic_optimization = False
        self.blocks = partition(model)
        if net.block_names != [b.name for b in self.blocks]:
            raise L2ZOError("the variance net was built for other blocks than the model's trainable parameters")
        self.pretrained = PretrainedCopy(self.blocks)  # taken before any checkpoint is restored
        n = block_weights(self.blocks, cfg.normalization, model=model, batch_size=cfg.data.batch_size)
        self.norm = SigmaNorm(n, cfg.normalization)
        self.states: dict[str, TaskState] = {t.name: TaskState() for t in self.tasks}
        self.teacher = make_teacher(self.blocks, cfg.teacher_lr, cfg.teacher_momentum)
        self.zsrc = ZSource()
        self.history: list[tuple[int, str, float]] = []  # (step, task, meta-loss)
        self.wall_time_s = 0.0

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = list(self.net.parameters())
        if self.cfg.meta_optimizer == "adam":
            return torch.optim.Adam(params, lr=self.cfg.meta_lr)
        return torch.optim.SGD(params, lr=self.cfg.meta_lr)

    # -- one meta-step ------------------------------------------------------------------------------
    def _loss_fn(self, task: MetaTask, examples: list[Example]) -> LossFn:
        batch = self.scorer.collate(examples).to(self.device)
        return lambda model: self.scorer.loss(model, batch, task.loss_kind)

    def _objective(self, state: TaskState, inners: list[LossFn], outer: LossFn, seeds: Sequence[int]) -> MetaResult:
        cfg = self.cfg
        if cfg.objective == "es":
            es = ESConfig(pairs=cfg.es_pairs, sigma=cfg.es_sigma, space=cfg.es_space, eps=cfg.eps, lr=cfg.inner_lr)
            extra = [(self.pretrained.values, TaskState(sigma_prev=state.sigma_prev, ref=state.ref))]
            return es_meta_loss(self.model, self.blocks, self.net, state, self.norm, inners, outer, seeds=seeds, cfg=es,
                                zsrc=self.zsrc, extra_starts=extra if cfg.es_starts == "both" else ())  # fmt: skip
        if cfg.objective == "greedy":
            return greedy_meta_loss(self.model, self.blocks, self.net, state, self.norm, inners[0], outer,
                                    seed=seeds[0], eps=cfg.eps, lr=cfg.inner_lr, zsrc=self.zsrc)  # fmt: skip
        return unrolled_meta_loss(self.model, self.blocks, self.net, state, self.norm, inners, outer, seeds=seeds,
                                  eps=cfg.eps, lr=cfg.inner_lr, zsrc=self.zsrc, differentiable_g=cfg.differentiable_g)  # fmt: skip

    def training_step(self, batch: Any, batch_idx: int) -> None:
        del batch, batch_idx  # a ticker: the step's data is planned from (seed, global_step), see plan_step
        t0 = time.perf_counter()
        cfg, step = self.cfg, int(self.global_step)
        plan = plan_step(cfg.seed, step, sizes=[(len(t.train), len(t.dev)) for t in self.tasks],
                         weights=cfg.task_weights, batch_size=cfg.data.batch_size, unroll=cfg.unroll_steps,
                         heldout=cfg.outer_batch == "heldout", p_teacher=cfg.p_teacher)  # fmt: skip
        task = self.tasks[plan.task]
        state = self.states[task.name]
        inners = [self._loss_fn(task, [task.train[i] for i in idx]) for idx in plan.inner]
        outer = inners[-1] if plan.outer is None else self._loss_fn(task, [task.dev[i] for i in plan.outer])

        # 2-3: the meta-objective and the net's update
        res = self._objective(state, inners, outer, plan.z_seeds)
        meta_loss = float(res.meta_loss.detach())
        if not math.isfinite(meta_loss):
            raise L2ZOError(f"non-finite meta-loss at step {step} on {task.name}; lower --inner-lr or --meta-lr")
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(res.meta_loss)
        clip = self.cfg.meta_grad_clip if self.cfg.meta_grad_clip is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.net.parameters(), clip))
        opt.step()

        # 4-6: recurrent state, then the trajectory
        state.record(res.probe, res.sigma.raw)
        eff = res.sigma.eff.detach()
        if plan.teacher:
            lr = teacher_lr(cfg.teacher_lr, step, cfg.reset_every)
            traj_loss = teacher_step(self.model, self.blocks, self.teacher, lambda: inners[0](self.model), lr,
                                     cfg.teacher_clip)  # fmt: skip
        else:
            on_policy_step(self.blocks, res.probe, eff.tolist(), cfg.inner_lr, self.zsrc)
            traj_loss = float(res.probe.loss)
        if (step + 1) % cfg.reset_every == 0:
            self.reset_trajectory()

        self.wall_time_s += time.perf_counter() - t0
        self.history.append((step, task.name, meta_loss))
        self._log_step(step, task.name, res, meta_loss, traj_loss, grad_norm, plan.teacher, eff)

    def reset_trajectory(self) -> None:
        """theta <- pretrained weights, a fresh teacher (no momentum), loss histories cleared (sigma_prev kept)."""
        self.pretrained.restore_(self.blocks)
        self.teacher = make_teacher(self.blocks, self.cfg.teacher_lr, self.cfg.teacher_momentum)
        for s in self.states.values():
            s.reset_losses()

    def _log_step(self, step: int, task: str, res: MetaResult, meta_loss: float, traj_loss: float, grad_norm: float,
                  teacher: bool, eff: Tensor) -> None:  # fmt: skip
        metrics = {
            "meta/loss": meta_loss,
            f"meta/loss/{task}": meta_loss,
            f"train/loss/{task}": traj_loss,
            "meta/c": float(res.sigma.c),
            "meta/grad_norm": grad_norm,
            "meta/sigma_mean": float(eff.float().mean()),
            "meta/teacher": float(teacher),
            "meta/wall_time_s": self.wall_time_s,
        }
        if self.cfg.objective == "greedy" and self.cfg.outer_batch == "inner":
            metrics["meta/lookahead_gain"] = float(res.probe.loss) - meta_loss
        if isinstance(res, ESResult):
            metrics.update(res.metrics)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=self.cfg.data.batch_size)
        self.log("meta_loss", meta_loss, prog_bar=True, logger=False, batch_size=self.cfg.data.batch_size)
        if step % self.cfg.histogram_every == 0 and isinstance(self.logger, TensorBoardLogger):
            exp = self.logger.experiment
            exp.add_histogram("meta/sigma", eff.float().cpu(), step)
            for kind, values in group_by_kind(self.blocks, eff).items():
                exp.add_histogram(f"sigma/{kind}", torch.tensor(values), step)

    # -- summaries ----------------------------------------------------------------------------------
    @torch.no_grad()
    def final_sigma(self) -> Tensor:
        """[B] effective sigma at the current theta, averaged over the tasks' recurrent states."""
        sig = [predict_sigma(self.net, self.blocks, s, self.norm).eff.double().cpu() for s in self.states.values()]
        return torch.stack(sig).mean(dim=0)

    def final_meta_loss(self, last: int = 50) -> float | None:
        """Mean meta-loss of the last ``last`` meta-steps (one step's loss is one noisy draw)."""
        tail = [loss for _, _, loss in self.history[-last:]]
        return sum(tail) / len(tail) if tail else None

    # -- checkpoint state that is not a module parameter --------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[STATE_KEY] = {
            "step": int(self.global_step),
            "teacher": self.teacher.state_dict(),
            "tasks": {name: s.state_dict() for name, s in self.states.items()},
            "history": [list(h) for h in self.history],
            "wall_time_s": self.wall_time_s,
            "config": dataclasses.asdict(self.cfg),  # --resume refuses another config (meta_train.check_resume)
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get(STATE_KEY)
        if extra is None:
            raise L2ZOError("this checkpoint was not written by `l2zo meta-train` (no meta-training state)")
        missing = sorted(set(self.states) - set(extra["tasks"]))
        if missing:
            raise L2ZOError(f"the checkpoint has no state for task(s) {missing}; resume with the same --tasks")
        self.teacher = make_teacher(self.blocks, self.cfg.teacher_lr, self.cfg.teacher_momentum)
        self.teacher.load_state_dict(extra["teacher"])
        self.states = {name: TaskState.from_state(extra["tasks"][name]) for name in self.states}
        self.history = [(int(s), str(t), float(v)) for s, t, v in extra["history"]]
        self.wall_time_s = float(extra["wall_time_s"])
