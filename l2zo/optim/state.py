"""Helpers shared by the ZO baselines: per-block state buffers, exact state reloads, per-block lr and decay.

* ``state_buffer`` allocates an optimizer state tensor for one block lazily, flat ([numel]) and fp32 by
  default (momentum, Adam moments and HiZOO's Hessian accumulate in fp32 even for bf16/fp16 weights).
* ``restore_state_dtypes`` undoes ``torch.optim.Optimizer.load_state_dict``'s cast of every floating
  state tensor to the parameter's dtype (it would turn fp32 moments of a bf16 model into bf16).
* ``lr_and_decay`` reads the per-block lr and MeZO-style decay factor from the param groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from l2zo.engine import Block


def state_buffer(
    opt: torch.optim.Optimizer, block: Block, name: str, fill: float = 0.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``opt.state[block.param][name]``, created as ``full([numel], fill)`` on the block's device on first use."""
    st = opt.state[block.param]
    buf = st.get(name)
    if buf is None:
        buf = torch.full((block.numel,), fill, dtype=dtype, device=block.param.device)
        st[name] = buf
    return buf


def restore_state_dtypes(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """Call after ``load_state_dict``: put back the saved dtype (and a private copy) of each state tensor.

    The base loader casts floating state to the parameter dtype and, when nothing changes, keeps a
    reference to the caller's tensor; both are wrong for fp32 state kept next to low-precision weights.
    """
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [p for g in opt.param_groups for p in g["params"]]
    for sid, p in zip(saved_ids, params):
        for key, value in state_dict["state"].get(sid, {}).items():
            if isinstance(value, torch.Tensor):
                opt.state[p][key] = value.to(device=p.device, copy=True)


def lr_and_decay(opt: torch.optim.Optimizer, blocks: Sequence[Block]) -> tuple[list[float], list[float]]:
    """Per-block learning rate and MeZO-style decay factor ``1 - lr * wd`` (wd is 0 on 1-D blocks)."""
    lrs, decays = [], []
    for b in blocks:
        group = opt.param_groups[b.index]
        lrs.append(float(group["lr"]))
        decays.append(1.0 - float(group["lr"]) * float(group["weight_decay"]))
    return lrs, decays
