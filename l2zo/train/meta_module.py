"""``MetaTrainModule``: the Lightning shell of meta-training; the algorithm lives in ``l2zo.learned.meta``.

One meta-step (``training_step``), in this order:

1. plan: task, inner/outer batches, z seeds and trajectory source, a pure function of (seed, step);
2. meta-objective at the current trajectory state theta (greedy look-ahead, K-step unrolled, or ES);
3. backward into the variance net only, and one step of the net's optimizer (the only Lightning optimizer);
4. the task's recurrent state takes the probe's (L+, L-) and the raw sigma;
5. the trajectory advances, explicitly and separately: a first-order teacher step or an on-policy ZO step;
6. every ``reset_every`` steps theta goes back to the pretrained weights and the teacher restarts.

Data-parallel (``--strategy ddp``): the step is planned on every process alike; each process probes and
evaluates the look-ahead on its slice of the batches, the probe's losses are the whole batch's (summed over the
processes), the net's meta-gradient is summed over them before the net's step, and the trajectory step (the
teacher's, on the whole batch) is the same everywhere, so the net and theta stay identical on every process.

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

from l2zo.blockstats.distill import OracleSpec, distill_meta_loss
from l2zo.blockstats.expected import expected_meta_loss
from l2zo.blockstats.state_stats import StatsSpec, batch_fns, measure_state, sampled_label_loss, stats_draws
from l2zo.blockstats.stats import BatchFns
from l2zo.engine import ZSource, partition
from l2zo.errors import L2ZOError
from l2zo.learned.drift import ExactAnchor
from l2zo.learned.es import ESConfig, ESResult, es_meta_loss
from l2zo.learned.meta import (
    LossFn,
    MetaResult,
    SigmaNorm,
    StepPlan,
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
from l2zo.optim.base import BatchLoss, batch_mean
from l2zo.tasks.base import Example
from l2zo.tasks.scoring import CandidateScorer
from l2zo.train.replicas import shard
from l2zo.train.strategies import sum_over_processes

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
        # theta_0 of the drift feature: the pretrained copy (every restart period starts there), exact, no new copy.
        self.anchor = ExactAnchor(self.pretrained.values) if net.spec.features.drift else None
        self.states: dict[str, TaskState] = {t.name: TaskState(anchor=self.anchor) for t in self.tasks}
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

    def _plan(self, step: int) -> StepPlan:
        cfg = self.cfg
        return plan_step(cfg.seed, step, sizes=[(len(t.train), len(t.dev)) for t in self.tasks],
                         weights=cfg.task_weights, batch_size=cfg.data.batch_size, unroll=cfg.unroll_steps,
                         heldout=cfg.outer_batch == "heldout", p_teacher=cfg.p_teacher)  # fmt: skip

    # -- objectives expected and distill: statistics from two train batches at theta
    def _stats_batch(self, task: MetaTask, examples: list[Example]) -> BatchFns:
        batch = self.scorer.collate(examples).to(self.device)
        sampled = None
        if task.loss_kind == "classification":  # the Fisher needs labels drawn from the model's candidate scores
            sampled = sampled_label_loss(lambda model: self.scorer.candidate_scores(model, batch))
        return batch_fns(self.model, lambda model: self.scorer.loss(model, batch, task.loss_kind), len(examples),
                         sampled)  # fmt: skip

    def _stats_objective(self, state: TaskState, inner: LossFn, seed: int) -> MetaResult:
        cfg, step = self.cfg, int(self.global_step)
        plan = self._plan(step)  # the step's task and first inner batch (a pure function of (seed, step))
        task = self.tasks[plan.task]
        first = [task.train[i] for i in plan.inner[0]]
        draws = stats_draws(cfg.seed, step, len(task.train), cfg.data.batch_size)
        spec = StatsSpec(probes=cfg.stats_probes, gHg_probes=cfg.stats_gHg_probes,
                         fisher_samples=cfg.stats_fisher_samples, curvature=cfg.stats_curvature)  # fmt: skip
        stats = measure_state(self.model, self.blocks, self._stats_batch(task, first),
                              self._stats_batch(task, [task.train[i] for i in draws.second]), spec, draws.seed)  # fmt: skip
        if cfg.objective == "expected":
            res, _ = expected_meta_loss(self.model, self.blocks, self.net, state, self.norm, inner, stats, seed=seed,
                                        eps=cfg.eps, zsrc=self.zsrc, horizon=cfg.expected_horizon,
                                        eta=None if cfg.expected_eta == "tuned" else cfg.inner_lr)  # fmt: skip
            return res
        oracle = OracleSpec(oracle=cfg.distill_oracle, temperature=cfg.distill_temperature, gamma=cfg.distill_gamma,
                            wf_eta=cfg.distill_wf_eta, floor=cfg.distill_floor)  # fmt: skip
        res, _ = distill_meta_loss(self.model, self.blocks, self.net, state, self.norm, inner, stats, seed=seed,
                                   eps=cfg.eps, zsrc=self.zsrc, oracle=oracle)  # fmt: skip
        return res

    def _sliced_loss_fns(self, task: MetaTask, examples: list[Example]) -> tuple[LossFn, LossFn]:
        """(probe, part) over this process's slice of ``examples``. ``probe`` gives the whole batch's mean loss as a
        value (summed over the processes: for the no-grad ZO probes); ``part`` this process's differentiable share
        of it, its mean weighted by its count over the whole batch's, so that the shares sum to the whole batch's
        mean and the summed meta-gradients are the whole batch's. On one process both are ``_loss_fn``."""
        reduce_fn = sum_over_processes(self.trainer)
        if reduce_fn is None:
            fn = self._loss_fn(task, examples)
            return fn, fn
        batch = self.scorer.collate(shard(examples, self.global_rank, self.trainer.world_size)).to(self.device)
        count = torch.as_tensor(self.scorer.loss_count(batch, task.loss_kind), dtype=torch.float32, device=self.device)
        weight = count / reduce_fn(count.clone())

        def probe(model: Any) -> Tensor:
            return batch_mean(BatchLoss(self.scorer.loss(model, batch, task.loss_kind), count), reduce_fn)

        def part(model: Any) -> Tensor:
            return self.scorer.loss(model, batch, task.loss_kind) * weight

        return probe, part

    def _sum_meta_gradient(self) -> None:
        """The net's gradients summed over the processes (one all-reduce of the small net's flat gradient)."""
        reduce_fn = sum_over_processes(self.trainer)
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        if reduce_fn is None or not grads:
            return
        total = reduce_fn(torch.cat([g.reshape(-1) for g in grads]))
        for g, new in zip(grads, total.split([g.numel() for g in grads]), strict=True):
            g.copy_(new.view_as(g))

    def _objective(self, state: TaskState, inners: list[LossFn], outer: LossFn, seeds: Sequence[int]) -> MetaResult:
        cfg = self.cfg
        if cfg.objective in ("expected", "distill"):
            return self._stats_objective(state, inners[0], seeds[0])
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
        plan = self._plan(step)
        task = self.tasks[plan.task]
        state = self.states[task.name]
        inner_examples = [[task.train[i] for i in idx] for idx in plan.inner]
        inners = [self._sliced_loss_fns(task, ex)[0] for ex in inner_examples]
        outer_examples = inner_examples[-1] if plan.outer is None else [task.dev[i] for i in plan.outer]
        outer = self._sliced_loss_fns(task, outer_examples)[1]

        # 2-3: the meta-objective and the net's update
        res = self._objective(state, inners, outer, plan.z_seeds)
        reduce_fn = sum_over_processes(self.trainer)
        meta_value = res.meta_loss.detach().float()
        meta_loss = float(meta_value if reduce_fn is None else reduce_fn(meta_value.clone()))
        if not math.isfinite(meta_loss):
            raise L2ZOError(f"non-finite meta-loss at step {step} on {task.name}; lower --inner-lr or --meta-lr")
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(res.meta_loss)
        self._sum_meta_gradient()
        clip = self.cfg.meta_grad_clip if self.cfg.meta_grad_clip is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.net.parameters(), clip))
        opt.step()

        # 4-6: recurrent state, then the trajectory
        state.record(res.probe, res.sigma.raw)
        eff = res.sigma.eff.detach()
        if plan.teacher:
            lr = teacher_lr(cfg.teacher_lr, step, cfg.reset_every)
            # Every process takes the teacher's step on the whole batch: the same step, and no gradient traffic.
            whole = self._loss_fn(task, inner_examples[0])
            traj_loss = teacher_step(self.model, self.blocks, self.teacher, lambda: whole(self.model), lr,
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
        for s in self.states.values():
            s.anchor = self.anchor
        self.history = [(int(s), str(t), float(v)) for s, t, v in extra["history"]]
        self.wall_time_s = float(extra["wall_time_s"])
