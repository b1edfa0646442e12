"""ZO fine-tuning inside transformers' ``Trainer``: ``ZOTrainer``, and ``ZOTrainerMixin`` for any Trainer subclass.

A Trainer script switches to MeZO, or to any other l2zo optimizer, learned ones included, by changing one class and
one argument::

    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate)           # backprop
    trainer = ZOTrainer(model=model, args=args, train_dataset=train, data_collator=collate,
                        zo_optimizer="mezo")                                                           # MeZO
    trainer = ZOTrainer(..., zo_optimizer="learned=checkpoints/tiny/zo-finetuner")                  # learned

and a Trainer subclass (TRL's ``SFTTrainer``, a project's own) by putting the mixin first:
``class ZOSFTTrainer(ZOTrainerMixin, SFTTrainer): pass``.

How the step fits the Trainer's loop (transformers 5.x ``Trainer._run_epoch``, which calls ``training_step`` per
micro-batch and then, on the last micro-batch of an accumulation window, clips, calls ``optimizer.step()`` with no
closure and steps the lr scheduler):

* ``training_step`` builds the closure (``compute_loss`` under ``torch.no_grad``, the model in eval mode so dropout
  is off in every probe), calls ``optimizer.step(closure)`` and returns the step's detached loss, (L+ + L-)/2 for
  two-point methods. No backward: no ``.grad`` is ever allocated.
* The Trainer's optimizer is a ``ZOStepAdapter`` around the l2zo optimizer (wrapped in turn by accelerate). Its
  closure-less ``step()``, which the loop calls right after, is a no-op that answers the ZO step already taken, so
  there is one step per window, never two (a closure-less step with no ZO step before it is an error).
* The lr scheduler the Trainer builds (``lr_scheduler_type``, warmup) acts on the l2zo optimizer's own
  ``param_groups``: the lr it sets is the lr the ZO update reads.
* ``max_grad_norm`` is ignored: there is no gradient to clip (the clipping and grad-norm hooks return None, so the
  logs carry no ``grad_norm``; they carry the last step's ``projected_grad`` instead).
* Gradient accumulation (``gradient_accumulation_steps`` k > 1) holds the seed fixed across the window's
  micro-batches: the first k-1 ``training_step`` calls only keep their micro-batch (and return 0, so the Trainer's
  logged loss is still the window's); the last one takes one ZO step whose closure is the window's loss, the sum
  over its micro-batches of each micro-batch's loss as the Trainer scales it for accumulation. So every micro-batch
  is probed along the same z, the update is that of one batch of k micro-batches (2k forwards for a two-point
  method), and forwards still run one micro-batch at a time, at one micro-batch's activation memory. This rather
  than refusing k > 1 because the closure makes it exact for every l2zo optimizer, whatever queries it makes.

The l2zo optimizer's hyperparameters: ``zo_args`` (and ``key=value`` items in the ``zo_optimizer`` string) first;
else the Trainer's ``learning_rate`` for ``lr``, its ``seed`` for the step seeds, and its non-zero
``weight_decay``, where the optimizer takes them. Refused with a one-line ``L2ZOError``: backprop optimizers
(``fo-*``: use the plain Trainer), optimizers that need an anchor batch (``mezo-svrg``), fp16 (its GradScaler steps
without the closure and needs gradients; bf16 and fp32 work), DeepSpeed, and more than one process or GPU (each
would take its own ZO step on its own batch and the replicas would drift apart; l2zo's own loop has data-parallel
ZO). Note for subclasses whose ``compute_loss`` reads ``model.training`` (TRL's metrics do): the probes run in eval
mode, on purpose.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import transformers
from torch import Tensor, nn

from l2zo.engine import eval_mode
from l2zo.errors import L2ZOError
from l2zo.integrations.step_adapter import ZOStepAdapter
from l2zo.optim.base import ZOOptimizer
from l2zo.optim.registry import OptimizerSpec, build_optimizer, get_optimizer_spec
from l2zo.optim.run_hparams import coerce_hparams

ZOOptimizerArg = str | ZOOptimizer | None


def parse_zo_optimizer(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME[=ARTIFACT][:key=value...]``, as an item of ``l2zo compare --optimizers``, -> (name, hyperparameters).

    ``"mezo"`` -> ("mezo", {}); ``"learned=DIR:lr=1e-4"`` -> ("learned", {"artifact": "DIR", "lr": 1e-4}).
    """
    from l2zo.config import parse_pair

    name, *pairs = text.split(":")
    hp: dict[str, Any] = {}
    if "=" in name:
        name, artifact = name.split("=", 1)
        hp["artifact"] = artifact.strip()
    for pair in pairs:
        hp.update([parse_pair(pair, "zo_optimizer")])
    return name.strip(), hp


def _checked_spec(name: str) -> OptimizerSpec:
    """The registry entry of ``name``, refused when ``training_step`` cannot drive it."""
    spec = get_optimizer_spec(name)
    if not spec.zeroth_order:
        raise L2ZOError(f"{name!r} is a backprop optimizer; ZOTrainer runs zeroth-order ones: use transformers.Trainer")
    if spec.needs_anchor_batch:
        raise L2ZOError(
            f"{name!r} needs an anchor batch (set_anchor_loss_fn), which ZOTrainer does not provide; "
            "use `l2zo finetune --optimizer " + name + "` or another optimizer"
        )
    return spec


def _checked_args(spec: OptimizerSpec, hp: dict[str, Any]) -> dict[str, Any]:
    """``hp`` with every key one ``spec`` takes and every value typed by its hyperparameter dataclass."""
    allowed = spec.hyperparameters()
    bad = sorted(set(hp) - set(allowed))
    if bad:
        raise L2ZOError(
            f"optimizer {spec.name!r} has no hyperparameter {', '.join(map(repr, bad))}; valid: {', '.join(allowed)}"
        )
    return coerce_hparams(spec.name, spec.hparams, hp)


class ZOTrainerMixin:
    """Zeroth-order steps for a ``transformers.Trainer`` subclass: put it first, ``class X(ZOTrainerMixin, Base)``.

    Args:
        zo_optimizer: a registered name (``l2zo optimizers`` lists them), in the compact form
            ``NAME[=ARTIFACT][:key=value...]``; or an already built l2zo optimizer over the model; None: MeZO, or
            the l2zo optimizer given as ``optimizers=(opt, scheduler)``.
        zo_args: its hyperparameters and run arguments (lr, eps, weight_decay, seed, include, exclude, artifact,
            ...), winning over the string's; only with a name.
        *args, **kwargs: the Trainer's own.

    See the module docstring for the step, the lr, gradient accumulation and what is refused.
    """

    def __init__(
        self, *args: Any, zo_optimizer: ZOOptimizerArg = None, zo_args: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        given = (kwargs.get("optimizers") or (None, None))[0]
        if zo_optimizer is not None and given is not None:
            raise L2ZOError("give the optimizer once: zo_optimizer=... or optimizers=(opt, scheduler), not both")
        if given is not None:
            zo_optimizer = given
        if zo_optimizer is None:
            zo_optimizer = "mezo"
        if isinstance(zo_optimizer, str):
            name, inline = parse_zo_optimizer(zo_optimizer)
            self.zo_spec: OptimizerSpec | None = _checked_spec(name)
            self.zo_args: dict[str, Any] = _checked_args(self.zo_spec, {**inline, **dict(zo_args or {})})
        elif isinstance(zo_optimizer, ZOOptimizer):
            if zo_args:
                raise L2ZOError("zo_args go with an optimizer name; a built optimizer already has its hyperparameters")
            self.zo_spec, self.zo_args = None, {}
        else:
            raise L2ZOError(
                f"zo_optimizer must be an l2zo optimizer name or a built l2zo ZO optimizer, got "
                f"{type(zo_optimizer).__name__}; backprop optimizers belong to the plain Trainer"
            )
        self._zo_built = zo_optimizer if isinstance(zo_optimizer, ZOOptimizer) else None
        self._zo_adapter: ZOStepAdapter | None = None
        self._zo_window: list[tuple[Any, Any]] = []  # micro-batches of the current accumulation window
        super().__init__(*args, **kwargs)
        self._check_zo_setup()

    # -- set-up -------------------------------------------------------------------------------------------
    def _check_zo_setup(self) -> None:
        """Refuse what the ZO step cannot run under (see the module docstring)."""
        args = self.args
        if getattr(args, "fp16", False):
            raise L2ZOError(
                "ZOTrainer cannot run with fp16=True: its GradScaler steps the optimizer without the closure and "
                "needs gradients; use bf16=True or full precision"
            )
        if getattr(self, "is_deepspeed_enabled", False):
            raise L2ZOError("ZOTrainer cannot run under DeepSpeed (its engine steps without the closure); drop it")
        processes = getattr(self.accelerator, "num_processes", 1)
        if processes > 1 or getattr(args, "n_gpu", 1) > 1:
            raise L2ZOError(
                f"ZOTrainer runs in one process on one device ({processes} processes, {args.n_gpu} GPUs here): each "
                "would take its own ZO step and the replicas would drift apart; use one device (CUDA_VISIBLE_DEVICES) "
                "or l2zo's own data-parallel loop"
            )

    def _build_zo(self, model: nn.Module) -> ZOOptimizer:
        """The l2zo optimizer over ``model``: the one given, or built from the spec with the Trainer's defaults."""
        if self._zo_built is not None:
            return self._zo_built
        assert self.zo_spec is not None
        spec, hp, args = self.zo_spec, dict(self.zo_args), self.args
        allowed = spec.hyperparameters()
        if "lr" in allowed:
            hp.setdefault("lr", args.learning_rate)
        if "seed" in allowed:
            hp.setdefault("seed", args.seed)
        if "weight_decay" in allowed and args.weight_decay:
            hp.setdefault("weight_decay", args.weight_decay)
        opt = build_optimizer(spec.name, model, **_checked_args(spec, hp))
        if not isinstance(opt, ZOOptimizer):
            raise L2ZOError(f"optimizer {spec.name!r} is not an l2zo ZO optimizer; use transformers.Trainer")
        return opt

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer: a ``ZOStepAdapter`` around the l2zo optimizer (built over the unwrapped model)."""
        self._check_zo_setup()
        self._zo_window = []  # a window an interrupted train() left half-filled is not carried into this one
        if self.optimizer is None or isinstance(self.optimizer, ZOOptimizer):
            self._zo_built = self.optimizer if isinstance(self.optimizer, ZOOptimizer) else self._zo_built
            opt_model = self.model if model is None else model
            zo = self._build_zo(opt_model)
            own = {id(p) for p in opt_model.parameters()}
            if any(id(b.param) not in own for b in zo.blocks):
                raise L2ZOError(
                    "the l2zo optimizer was built over another model than the Trainer's; build it over model"
                )
            self.optimizer = ZOStepAdapter(zo)
        opt: Any = self.optimizer
        while not isinstance(opt, ZOStepAdapter):  # a train() after the first: accelerate's wrapper around it
            if not hasattr(opt, "optimizer"):
                raise L2ZOError(
                    f"ZOTrainer's optimizer was replaced by a {type(opt).__name__}; pass it as zo_optimizer"
                )
            opt = opt.optimizer
        self._zo_adapter = opt
        return self.optimizer

    @property
    def zo_optimizer(self) -> ZOOptimizer:
        """The l2zo optimizer (built when training starts)."""
        if self._zo_adapter is None:
            self.create_optimizer()
        assert self._zo_adapter is not None
        return self._zo_adapter.zo

    # -- the step -----------------------------------------------------------------------------------------
    def training_step(
        self, model: nn.Module, inputs: dict[str, Tensor | Any], num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        """Keep the micro-batch; on the last of its accumulation window, one ZO step over the window.

        Returns:
            the step's loss as a detached fp32 scalar on ``args.device`` (0 for the micro-batches before the last).
        """
        if self._zo_adapter is None:  # called outside train(): build the optimizer as train() would
            self.create_optimizer()
        adapter = self._zo_adapter
        assert adapter is not None
        model.train()  # as the Trainer leaves it; the probes below run in eval mode
        self._zo_window.append((self._prepare_inputs(inputs), num_items_in_batch))
        if not self.accelerator.sync_gradients:  # not yet the window's last micro-batch
            return torch.zeros((), device=self.args.device)
        window, self._zo_window = self._zo_window, []

        def closure() -> Tensor:
            return self._window_loss(model, window)

        with eval_mode(model):
            loss = adapter.step(closure)
        return loss.detach().float().to(self.args.device)

    def _window_loss(self, model: nn.Module, window: list[tuple[Any, Any]]) -> Tensor:
        """The loss of an accumulation window: its micro-batches' losses, each scaled as the Trainer scales it."""
        total: Tensor | None = None
        for inputs, num_items in window:
            with self.compute_loss_context_manager():
                # A copy: compute_loss pops "labels" off its inputs when it smooths labels, and the closure runs twice.
                loss = self.compute_loss(model, copy.copy(inputs), num_items_in_batch=num_items)
            if not self._loss_scaled_for_accumulation(num_items):
                loss = loss / len(window)
            total = loss if total is None else total + loss
        assert total is not None
        return total

    def _loss_scaled_for_accumulation(self, num_items: Tensor | int | None) -> bool:
        """Whether ``compute_loss`` already normalised over the window (the Trainer's own rule)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        accepts = getattr(self, "model_accepts_loss_kwargs", False)
        return bool((accepts and num_items is not None) or getattr(self, "compute_loss_func", None) is not None)

    # -- what a backprop loop would do with gradients -----------------------------------------------------
    def _clip_grad_norm(self, model: nn.Module) -> None:
        """No gradient, nothing to clip: ``max_grad_norm`` is ignored."""
        return None

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> None:
        """No gradient norm to report (the logs carry ``projected_grad``)."""
        return None

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's log, plus the last ZO step's projected gradient g next to the training loss."""
        probe = self._zo_adapter.zo.last_probe if self._zo_adapter is not None else None
        if probe is not None and "loss" in logs:
            logs = {**logs, "projected_grad": probe.projected_grad}
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


class ZOTrainer(ZOTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` with zeroth-order steps: ``ZOTrainer(model=..., args=..., zo_optimizer="mezo",
    zo_args={"lr": 1e-6, "eps": 1e-3})``. See the module docstring."""
