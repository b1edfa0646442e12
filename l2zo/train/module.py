"""``FinetuneModule``: the Lightning shell around one optimizer fine-tuning one model on one task.

Manual optimization: a ZO optimizer's ``step(closure)`` runs the forwards itself. First-order
optimizers (the fo-* references) get a closure that also runs backward. The module owns no
algorithm: it logs, times and evaluates.

Checkpoints (``l2zo finetune --resume``): Lightning saves the weights :meth:`FinetuneModule.checkpoint_weights`
chooses, the optimizer and lr scheduler states and the loop progress; the module adds its run record (dev
history, step times, per-step batch digests) and the global RNG state under ``RUN_STATE_KEY``, so that a
resumed run reports, and continues, the whole run.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from l2zo.learned.artifact import sigma_by_kind
from l2zo.optim.base import BatchLoss, ZOOptimizer
from l2zo.tasks.scoring import CandidateScorer, ScoringBatch
from l2zo.train.sharded import configure_sharding
from l2zo.train.strategies import sum_over_processes
from l2zo.utils.memory import peak_memory_mb

# An allocation's sigma per block kind goes to TensorBoard every this many steps: a curve, at a tenth of the bytes
# of every step's (about as many scalars as the rest of a step's metrics together; compares are kept in git).
SIGMA_LOG_EVERY = 10

OptimizerBuilder = Callable[[nn.Module], torch.optim.Optimizer]

RUN_STATE_KEY = "l2zo_finetune"  # the module's part of a Lightning checkpoint
_DIGEST_HEAD = 8  # per-step digests shown in summary.json, to locate where two batch sequences part


class FinetuneModule(L.LightningModule):
    """Fine-tune ``model`` with the optimizer ``build_optimizer(model)`` returns.

    Logged tags (the same for every optimizer, so TensorBoard overlays runs): train/loss,
    train/projected_grad, train/lr, train/step_time_s, train/peak_mem_mb, train/forward_passes,
    val/loss, val/acc, test/loss, test/acc.
    """

    def __init__(
        self,
        model: nn.Module,
        scorer: CandidateScorer,
        loss_kind: str,
        build_optimizer: OptimizerBuilder,
        zeroth_order: bool,
        forwards_per_step: int,
        lr_schedule: str = "constant",
        total_steps: int = 1,
        needs_anchor_batch: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.scorer = scorer
        self.loss_kind = loss_kind
        self._build_optimizer = build_optimizer
        self.zeroth_order = zeroth_order
        self.forwards_per_step = forwards_per_step
        self.needs_anchor_batch = needs_anchor_batch  # OptimizerSpec.needs_anchor_batch (mezo-svrg)
        self.lr_schedule = lr_schedule
        self.total_steps = total_steps
        self.automatic_optimization = False
        self.step_times: list[float] = []
        self.history: dict[str, list[tuple[int, float]]] = {"val/loss": [], "val/acc": []}
        self.test_metrics: dict[str, float] = {}
        self._sums: dict[str, float] = {}
        # Digest of the training batch sequence (l2zo compare checks that every optimizer saw the same
        # batches in the same order): sha256 over each step's token ids and labels, one 32-byte digest per
        # step, kept (a checkpoint carries them: a running sha256 cannot be saved).
        self._step_digests: list[bytes] = []
        self._rng_to_restore: dict[str, torch.Tensor] | None = None

    @property
    def batch_digest(self) -> str:
        """sha256 of the per-step batch digests so far, in order."""
        return hashlib.sha256(b"".join(self._step_digests)).hexdigest()

    @property
    def batch_digests_head(self) -> list[str]:
        """The first few per-step digests (16 hex digits each)."""
        return [d.hex()[:16] for d in self._step_digests[:_DIGEST_HEAD]]

    def _digest_batch(self, batch: ScoringBatch) -> None:
        step = hashlib.sha256()
        for t in (batch.input_ids, batch.labels):
            step.update(t.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
        self._step_digests.append(step.digest())

    # -- checkpoints --------------------------------------------------------------------------------
    def checkpoint_weights(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint keeps: the one place that chooses them. Full fine-tuning trains every
        weight, so all of them. A PEFT run would return its adapter's weights only (and set
        ``self.strict_loading = False``, so that Lightning restores them into the full model)."""
        return self.state_dict()

    def restore_weights(self) -> None:
        """Take the two-pass step's look-ahead perturbation off the weights (``ZOOptimizer.restore_``): every
        evaluation, checkpoint and the end of training see theta itself."""
        trainer = self._trainer  # None outside a Trainer
        for opt in trainer.optimizers if trainer is not None else ():
            if isinstance(opt, ZOOptimizer):
                opt.restore_()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.restore_weights()  # before the weights are read (Lightning's own copy of them references the same tensors)
        checkpoint["state_dict"] = self.checkpoint_weights()
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        raw = bytearray(b"".join(self._step_digests))
        digests = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        checkpoint[RUN_STATE_KEY] = {
            "history": {k: [list(sv) for sv in v] for k, v in self.history.items()},
            "step_times": list(self.step_times),
            "step_digests": digests.reshape(-1, 32),  # [steps, 32]
            "rng": rng,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint[RUN_STATE_KEY]
        self.history = {k: [(int(s), float(v)) for s, v in sv] for k, sv in state["history"].items()}
        self.step_times = [float(t) for t in state["step_times"]]
        raw = state["step_digests"].numpy().tobytes()
        self._step_digests = [raw[i : i + 32] for i in range(0, len(raw), 32)]
        self._rng_to_restore = state["rng"]

    def on_train_start(self) -> None:
        # The global RNG (dropout in first-order steps) as it was when the checkpoint was taken; restored here,
        # after Lightning has built the train dataloader's iterator (which draws from it), not at load time.
        if self._rng_to_restore is not None:
            torch.set_rng_state(self._rng_to_restore["cpu"])
            if "cuda" in self._rng_to_restore and self.device.type == "cuda":
                torch.cuda.set_rng_state(self._rng_to_restore["cuda"], self.device)
            self._rng_to_restore = None

    def configure_model(self) -> None:
        # --strategy fsdp shards the model here, before configure_optimizers builds the optimizer on the shards.
        configure_sharding(self, self.model)

    def configure_optimizers(self) -> Any:
        # The model is already on its device here, so optimizer state is allocated there.
        opt = self._build_optimizer(self.model)
        if isinstance(opt, ZOOptimizer):  # data-parallel: every query sees the loss over all processes' slices
            opt.reduce_fn = sum_over_processes(self.trainer)
        if self.needs_anchor_batch:  # variance-reduced methods (mezo-svrg) need a fixed large batch
            opt.set_anchor_loss_fn(self._large_batch_loss_fn())
        if self.lr_schedule == "linear":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1.0 - t / self.total_steps))
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)
        return [opt], [sched]

    def _large_batch_loss_fn(self, num_examples: int = 512, micro_batch: int = 32) -> Callable[[], torch.Tensor]:
        """A closure: the mean loss over the first ``num_examples`` training examples, in micro-batches."""
        examples = self.trainer.datamodule.data.train[:num_examples]
        batches = [self.scorer.collate(examples[i : i + micro_batch]) for i in range(0, len(examples), micro_batch)]

        def loss_fn() -> torch.Tensor:
            total = torch.zeros((), device=self.device)
            for b in batches:
                total += self._loss(b.to(self.device)) * len(b)
            return total / len(examples)

        return loss_fn

    def transfer_batch_to_device(self, batch: ScoringBatch, device: torch.device, dataloader_idx: int) -> ScoringBatch:
        return batch.to(device)

    def _loss(self, batch: ScoringBatch) -> torch.Tensor:
        return self.scorer.loss(self.model, batch, self.loss_kind)

    def training_step(self, batch: ScoringBatch, batch_idx: int) -> None:
        # Step through Lightning's wrapper: it counts optimizer steps (global_step, hence max_steps and
        # val_check_interval); stepping the raw optimizer counts nothing and training never stops.
        pl_opt = self.optimizers()
        opt = pl_opt.optimizer
        sched = self.lr_schedulers()
        self._digest_batch(batch)  # before t0: not part of the step time
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if self.zeroth_order:
            # The count lets a data-parallel step weigh this process's slice (ZOOptimizer.reduce_fn).
            count = self.scorer.loss_count(batch, self.loss_kind) if isinstance(opt, ZOOptimizer) else None
            loss = pl_opt.step(lambda: self._loss(batch) if count is None else BatchLoss(self._loss(batch), count))
        else:
            self.model.train()

            def closure() -> torch.Tensor:
                opt.zero_grad(set_to_none=True)
                loss = self._loss(batch)
                loss.backward()
                return loss

            with torch.enable_grad():
                loss = pl_opt.step(closure)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.step_times.append(dt)
        lr = opt.param_groups[0]["lr"]
        sched.step()
        probe = getattr(opt, "last_probe", None)
        metrics = {
            "train/loss": loss.detach().float(),
            "train/lr": float(lr),
            "train/step_time_s": dt,
            "train/peak_mem_mb": peak_memory_mb(self.device),
            "train/forward_passes": float(self.global_step * self.forwards_per_step),  # counted after the step
        }
        if probe is not None:
            metrics["train/projected_grad"] = probe.projected_grad
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, batch_size=int(batch.labels.numel()))
        self.log("loss", metrics["train/loss"], prog_bar=True, logger=False, batch_size=int(batch.labels.numel()))
        sigma = getattr(opt, "last_sigma", None)
        step = int(self.global_step)  # counted after the step: 1 on the first
        if sigma is not None and self.logger is not None and (step == 1 or step % SIGMA_LOG_EVERY == 0):
            # An allocation's mean sigma per block kind; to the logger itself, since self.log re-logs a key every step.
            names = [b.name for b in opt.blocks]
            kinds = sigma_by_kind(names, torch.as_tensor(sigma))
            self.logger.log_metrics({f"sigma/{k}": v for k, v in kinds.items()}, step=step)

    # -- evaluation: sums over the whole split, logged once per evaluation -------------------------
    def on_train_end(self) -> None:
        self.restore_weights()

    def _eval_start(self) -> None:
        self.restore_weights()
        self._sums = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}

    def _eval_step(self, batch: ScoringBatch) -> None:
        out = self.scorer.evaluate(self.model, batch)
        for k in self._sums:
            self._sums[k] += float(out[k])

    def _eval_end(self, prefix: str) -> dict[str, float]:
        if self.trainer.world_size > 1:  # each process evaluated its slice of the split: the sums of all of them
            local = torch.tensor([self._sums[k] for k in self._sums], dtype=torch.float64, device=self.device)
            self._sums = dict(zip(self._sums, self.trainer.strategy.reduce(local, reduce_op="sum").tolist()))
        n = max(self._sums["count"], 1.0)
        metrics = {f"{prefix}/loss": self._sums["loss_sum"] / n, f"{prefix}/acc": self._sums["correct"] / n}
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=prefix == "val", logger=False)
        # To TensorBoard at x = optimizer steps done: Lightning would put validation inside fit at
        # global_step - 1 but a standalone validate at global_step (the step-0 and step-1 evaluations
        # collide at eval_every=1), and l2zo compare/report read the dev curves back from these events.
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=int(self.global_step))
        return metrics

    def on_validation_epoch_start(self) -> None:
        self._eval_start()

    def validation_step(self, batch: ScoringBatch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        metrics = self._eval_end("val")
        step = int(self.global_step)
        for k, v in metrics.items():
            if not self.history[k] or self.history[k][-1][0] != step:
                self.history[k].append((step, v))

    def on_test_epoch_start(self) -> None:
        self._eval_start()

    def test_step(self, batch: ScoringBatch, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self.test_metrics = self._eval_end("test")
