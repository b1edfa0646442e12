"""The trajectory meta-training draws its states theta_t from: teacher steps, on-policy steps, periodic reset.

Each meta-step evaluates the meta-objective at the current theta_t and then advances theta with one of:

* the paper's first-order teacher: SGD with momentum 0.8 on the inner batch, gradient norm clipped to 1.0,
  the learning rate decayed linearly to 0 within each restart period (``teacher_step``);
* an on-policy step: the learned ZO optimizer's own update ``theta -= lr * g * c*sigma*z`` with the
  current net (``on_policy_step``), so the net is trained on the states it will see at deployment.

Every ``period`` meta-steps theta goes back to the pretrained weights (a CPU copy, ``PretrainedCopy``)
and the teacher's momentum is dropped, as the paper re-creates its optimizer. Pure functions and plain
classes; no Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from l2zo.engine import Block, ZSource, axpby_z_
from l2zo.engine.estimator import Probe

LossFn = Callable[[], Tensor]


class PretrainedCopy:
    """A CPU copy of the blocks' pretrained values, to reset the trajectory to.

    Only the blocks are copied: they are all the trajectory changes (tied weights are one block).
    """

    def __init__(self, blocks: Sequence[Block]) -> None:
        self.values: list[Tensor] = [b.param.detach().to("cpu", copy=True) for b in blocks]

    @torch.no_grad()
    def restore_(self, blocks: Sequence[Block]) -> None:
        """Copy the pretrained values back into ``blocks`` in place (exact: a copy, not arithmetic)."""
        for b, v in zip(blocks, self.values, strict=True):
            b.param.copy_(v)


def make_teacher(blocks: Sequence[Block], lr: float, momentum: float = 0.8) -> torch.optim.SGD:
    """The teacher's SGD over the blocks; a fresh one (no momentum buffers) after every reset."""
    return torch.optim.SGD([b.param for b in blocks], lr=lr, momentum=momentum)


def teacher_lr(base_lr: float, step: int, period: int) -> float:
    """Linear decay from ``base_lr`` to 0 within each restart period of ``period`` meta-steps."""
    return base_lr * (1.0 - (step % period) / period)


def teacher_step(
    model: nn.Module,
    blocks: Sequence[Block],
    opt: torch.optim.Optimizer,
    loss_fn: LossFn,
    lr: float,
    clip: float | None = 1.0,
) -> float:
    """One first-order step: forward+backward in train mode, clip, SGD(momentum). Returns the loss.

    Gradients go to the blocks' ``.grad`` only for this step and are cleared after it, so the
    meta-objective's backward never sees them.
    """
    for group in opt.param_groups:
        group["lr"] = lr
    mode = model.training
    model.train()
    try:
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = loss_fn()
            loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([b.param for b in blocks], clip)
        opt.step()
    finally:
        opt.zero_grad(set_to_none=True)
        model.train(mode)
    return float(loss.detach())


@torch.no_grad()
def on_policy_step(blocks: Sequence[Block], probe: Probe, sigma: Sequence[float], lr: float, zsrc: ZSource) -> None:
    """The learned ZO optimizer's update theta_b -= lr * g * sigma_b * z_b(seed), reusing the meta-step's probe.

    ``sigma`` [B] is the effective (normalised) sigma the probe was taken with, and theta must already be
    restored (``two_point_estimate``). This is ``LearnedZO``'s update (weight decay 0) for the same net,
    features and seed, without its two extra forwards.
    """
    g = probe.projected_grad
    axpby_z_(blocks, probe.seed, zsrc, [-lr * g * float(s) for s in sigma])
