"""MeZO's published step, written from its pseudo-code (reference/baselines.md §3.1), as the bench's yardstick.

It is what ``princeton-nlp/MeZO``'s ``zo_step`` + ``zo_update`` do, in our words: a fresh seed from the host RNG,
``torch.manual_seed(seed)`` (the global RNG) before each of four passes, z drawn parameter by parameter in
``named_parameters`` order, out-of-place updates ``p.data = p.data + scale * eps * z`` (each allocates z and a new
copy of the matrix), restore and update as separate passes (four regenerations), and ``.item()`` for g.
Weight decay skips parameters named like biases and layer norms, as the reference does (by name).

Never used for training in l2zo: ``l2zo.optim.MeZO`` is the same algorithm, fused and in place.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from torch import nn

_NO_DECAY = ("bias", "layer_norm", "layernorm")


def _perturb(params: list[tuple[str, nn.Parameter]], seed: int, scale: float, eps: float) -> None:
    torch.manual_seed(seed)
    for _, p in params:
        z = torch.normal(mean=0.0, std=1.0, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
        p.data = p.data + scale * eps * z


def mezo_reference_step(model: nn.Module, loss_fn: Callable[[], torch.Tensor], *, lr: float, eps: float = 1e-3,
                        weight_decay: float = 0.0, rng: random.Random | None = None) -> float:  # fmt: skip
    """One step of the reference loop on ``model``'s trainable parameters; returns L+ as the reference logs it.

    ``loss_fn()`` runs a forward on ``model`` and returns a scalar. The autocast weight cache is cleared before
    each forward: the reference assigns new tensors to ``p.data``, which the cache would not notice.
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    seed = (rng or random).randint(0, 1_000_000_000)
    was_training = model.training
    model.eval()
    try:
        _perturb(params, seed, +1, eps)
        with torch.inference_mode():
            torch.clear_autocast_cache()
            loss_plus = loss_fn().float()
        _perturb(params, seed, -2, eps)
        with torch.inference_mode():
            torch.clear_autocast_cache()
            loss_minus = loss_fn().float()
        _perturb(params, seed, +1, eps)
        g = ((loss_plus - loss_minus) / (2 * eps)).item()
        torch.manual_seed(seed)
        for name, p in params:
            z = torch.normal(mean=0.0, std=1.0, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            if weight_decay and not any(k in name for k in _NO_DECAY):
                p.data = p.data - lr * (g * z + weight_decay * p.data)
            else:
                p.data = p.data - lr * g * z
    finally:
        torch.clear_autocast_cache()
        model.train(was_training)
    return float(loss_plus)
