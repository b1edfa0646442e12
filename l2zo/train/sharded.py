"""Sharded ZO (``--strategy fsdp``): FSDP2 ``fully_shard`` through Lightning's ``ModelParallelStrategy``.

For models larger than one device. Each rank holds rows [r0, r1) of every parameter (FSDP2 shards dim 0,
unevenly when the rows do not divide) and its own shard of each batch. A step is MeZO's, on the shards:

* the perturbation and the update touch the local rows only, with z regenerated for exactly those rows
  (``Block.local``/``Block.span``, ``l2zo.engine.seeding``): the union over ranks is the unsharded z;
* every forward all-gathers the weights (FSDP2), so L(theta +/- eps*z) is the loss of the full model on
  the rank's data; the closure all-reduces (sum of loss * count, count), so every rank gets the same L+ and
  L-, hence the same projected gradient, and applies the same update to its rows.

No gradient and no optimizer state exists to shard: besides FSDP2's all-gathers of the weights in each
forward, the processes exchange two scalars a forward.

Which optimizers run sharded: those whose step is MeZO's with a per-block scale that does not read the
weights (``mezo``, ``fixed-sigma``, ...). Methods with per-entry state, their own directions or weight
statistics (the learned optimizer's features are per-block norms, which a shard sees only part of) are
refused (:func:`check_shardable`).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy, SingleDeviceStrategy
from torch import Tensor, nn
from torch.optim import Optimizer

from l2zo.errors import L2ZOError
from l2zo.optim.base import ZOOptimizer


def check_shardable(opt: Optimizer) -> None:
    """Refuse an optimizer that cannot run on row shards (see the module doc), with the fix.

    First-order optimizers (fo-*) are fine: FSDP2 reduces their gradients itself.
    """
    if not isinstance(opt, ZOOptimizer):
        return
    cls = type(opt)
    # A method overriding a step hook (l2zo.optim.base), or whose sigma() reads the weights (the learned
    # optimizer's per-block statistics), does something per entry that a shard cannot do alone.
    custom, reads_weights = cls.custom_hooks(), cls.sigma_reads_weights
    if custom or reads_weights:
        what = f"its own {', '.join(h.strip('_') for h in custom)}" if custom else "a sigma from the weights"
        raise L2ZOError(
            f"--strategy fsdp runs optimizers whose step is MeZO's (mezo, fixed-sigma); {cls.__name__} has {what}, "
            "which a row shard cannot compute alone: use --strategy ddp (the model must fit on one device)"
        )


def shard_model(model: nn.Module, mesh: Any) -> nn.Module:
    """``fully_shard`` every decoder layer, then the root, over the 1-D ``mesh``; in place, returns ``model``.

    The layers are found without naming any model: the classes a ``PreTrainedModel`` lists in
    ``_no_split_modules`` (those transformers' ``device_map`` keeps whole). Each layer is one all-gather; the
    root group holds the rest (embeddings, tied head, final norm). Idempotent: an already sharded model is kept.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return model
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if module is not model and type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh, reshard_after_forward=True)
    # The root too: by default FSDP2 keeps the root's weights gathered after a forward (for the backward), and
    # the next forward would then not see the perturbation written into the shards.
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model


def reduced_closure(closure: Callable[[], Tensor], count: int, group: Any = None) -> Callable[[], Tensor]:
    """A closure whose loss is the mean over every rank's examples: all-reduce (loss * count, count).

    ``count``: the examples of this rank's batch; uneven last batches stay exact. Every rank receives the same
    value. (A minimal local reduce; the data-parallel strategy's ``reduce_fn`` does the same for DDP.)
    """

    def reduced() -> Tensor:
        loss = closure()
        n = torch.full((), float(count), dtype=torch.float64, device=loss.device)
        both = torch.stack([loss.detach().to(torch.float64) * n, n])  # on the loss's device: no host sync here
        dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
        return (both[0] / both[1]).to(loss.dtype)

    return reduced


class ShardedZOStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` as pure FSDP2: one data-parallel mesh dimension over every process, no tensor
    parallelism; the module shards its model in ``configure_model`` (:func:`configure_sharding`).

    ZO steps get a closure whose loss is all-reduced over the ranks (:func:`reduced_closure`). Checkpoints are
    one file written by rank 0 (``save_distributed_checkpoint=False``), so l2zo's checkpoint IO keeps working.
    """

    def __init__(self, process_group_backend: str | None = None, timeout: timedelta | None = None) -> None:
        kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        super().__init__(save_distributed_checkpoint=False, process_group_backend=process_group_backend, **kwargs)
        self._batch_count = 0

    def setup_environment(self) -> None:
        # Known only now (the trainer set the devices and nodes): every process is a data-parallel shard.
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def setup_optimizers(self, trainer: L.Trainer) -> None:
        super().setup_optimizers(trainer)
        for opt in self.optimizers:
            check_shardable(opt)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        batch = args[0] if args else kwargs.get("batch")
        self._batch_count = len(batch)
        return super().training_step(*args, **kwargs)

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        inner = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps it
        if isinstance(inner, ZOOptimizer) and dist.is_initialized():
            # Reduced here unless the loop already gave the optimizer a reduce (the data-parallel reduce_fn).
            if getattr(inner, "reduce_fn", None) is None:
                closure = reduced_closure(closure, self._batch_count)
            _reshard(self.model)  # the forwards must gather the shards the step writes into (see shard_model)
        return super().optimizer_step(optimizer, closure, model, **kwargs)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        # The weights the module chose (FinetuneModule.checkpoint_weights: its state_dict) are this rank's shards:
        # the file gets them whole, gathered on every rank (a collective; every rank saves), written by rank 0.
        if "state_dict" in checkpoint:
            checkpoint["state_dict"] = {k: _whole(v) for k, v in checkpoint["state_dict"].items()}
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """A one-file checkpoint (:meth:`save_checkpoint`): every rank reads it and keeps its rows of each weight."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        path = Path(self.broadcast(checkpoint_path))
        checkpoint = self.checkpoint_io.load_checkpoint(path, weights_only=weights_only)
        assert self.model is not None and self.lightning_module is not None
        strict = self.lightning_module.strict_loading
        options = StateDictOptions(full_state_dict=True, strict=strict)
        set_model_state_dict(self.model, checkpoint["state_dict"], options=options)
        for opt, state in zip(self.optimizers, checkpoint.get("optimizer_states", [])):
            inner = getattr(opt, "_optimizer", opt)
            if isinstance(inner, ZOOptimizer):
                inner.load_state_dict(state)  # the same on every rank (see optimizer_state)
            else:  # first order: as Lightning's own loader of a one-file checkpoint
                from lightning.fabric.strategies.model_parallel import _rekey_optimizer_state_if_needed
                from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

                state = _rekey_optimizer_state_if_needed(state, self.model)
                set_optimizer_state_dict(self.model, inner, state, options=options)
        return checkpoint

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        # A ZO optimizer's state is its step count, seed and hyperparameters (check_shardable admits no per-entry
        # state), the same on every rank: saved as is. torch's sharded optimizer state dict would first run a
        # step without a closure to create state, which a ZO optimizer refuses.
        inner = getattr(optimizer, "_optimizer", optimizer)
        if isinstance(inner, ZOOptimizer):
            return inner.state_dict()
        return super().optimizer_state(optimizer)


def whole_state_dict(model: nn.Module) -> dict[str, Tensor] | None:
    """``model``'s state dict with its sharded tensors gathered whole on the CPU, for ``save_pretrained(...,
    state_dict=...)``; None for a model with no sharded tensor (saved as it is). A collective: every rank calls it.
    Tied weights stay one tensor (gathered once), so the saved model keeps them tied."""
    state = model.state_dict()
    if not any(hasattr(v, "full_tensor") for v in state.values()):
        return None
    gathered: dict[tuple[int, tuple[int, ...]], Tensor] = {}
    out = {}
    for k, v in state.items():
        key = (v.to_local().data_ptr() if hasattr(v, "to_local") else v.data_ptr(), tuple(v.shape))  # tied: one key
        if key not in gathered:
            gathered[key] = _whole(v)
        out[k] = gathered[key]
    return out


def _whole(value: Any) -> Any:
    """A sharded tensor gathered whole, on the CPU (collective); anything else as it is."""
    if hasattr(value, "full_tensor"):
        return value.full_tensor().cpu()
    return value


def _reshard(model: nn.Module | None) -> None:
    """Put every FSDP2 group of ``model`` back into its sharded state (a no-op for those already sharded)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules() if model is not None else ():
        if isinstance(module, FSDPModule):
            module.reshard()


def make_fsdp_strategy(
    args: Any = None, *, process_group_backend: str | None = None, timeout: timedelta | None = None
) -> ShardedZOStrategy:
    """The strategy of ``--strategy fsdp`` (gloo on CPU, nccl on GPU unless ``process_group_backend`` says).

    ``args``: the run's distributed arguments; unused, as the trainer passes the devices and nodes and every
    process is one data-parallel shard.
    """
    return ShardedZOStrategy(process_group_backend=process_group_backend, timeout=timeout)


class DeviceMapStrategy(SingleDeviceStrategy):
    """One process with a model that ``--device-map auto`` spread over the GPUs: Lightning must not move it.

    The root device (where batches go) is the first parameter's, the input embeddings'; transformers' hooks move
    the activations from layer to layer. The ZO engine perturbs each weight on its own device.
    """

    def __init__(self) -> None:
        super().__init__(device=torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))

    def setup(self, trainer: L.Trainer) -> None:
        assert self.model is not None
        self._root_device = next(self.model.parameters()).device
        super().setup(trainer)

    def model_to_device(self) -> None:
        pass  # placed by the device map


def make_device_map_strategy() -> DeviceMapStrategy:
    """The strategy of ``--device-map auto`` (one process; see :class:`DeviceMapStrategy`)."""
    return DeviceMapStrategy()


def configure_sharding(module: L.LightningModule, model: nn.Module) -> None:
    """Shard ``model`` when ``module`` runs under :class:`ShardedZOStrategy`; nothing otherwise.

    Called from the module's ``configure_model`` (every trainer entry: fit, validate, test; idempotent).
    """
    trainer = module._trainer
    if trainer is None or not isinstance(trainer.strategy, ShardedZOStrategy):
        return
    shard_model(model, module.device_mesh["data_parallel"])
