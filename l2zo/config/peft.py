"""``PeftArgs``: a parameter-efficient adapter (through the ``peft`` library), one nested config shared by finetune,
compare and meta-train. Without ``peft`` the run fine-tunes every weight, as before."""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

from l2zo.config.checks import check_fields
from l2zo.config.values import split_list
from l2zo.errors import L2ZOError

PeftScheme = Literal["none", "lora", "prefix", "prompt"]
PEFT_SCHEMES: tuple[str, ...] = typing.get_args(PeftScheme)
PEFT_KEYS = ("peft", "peft_rank", "peft_alpha", "peft_dropout", "peft_target_modules", "peft_virtual_tokens")


@dataclasses.dataclass
class PeftArgs:
    """Adapter (flags --peft ... or --adapter.peft ...; YAML keys at the top or under adapter:)"""

    peft: PeftScheme = "none"
    """train an adapter instead of every weight: lora, prefix (prefix tuning) or prompt (prompt tuning); ZO then
    perturbs the adapter's tensors only; none: full fine-tuning"""
    peft_rank: int = 8
    """LoRA rank r (MeZO: 8)"""
    peft_alpha: float = 16.0
    """LoRA alpha: the update is scaled by alpha / r (MeZO: 16)"""
    peft_dropout: float = 0.0
    """LoRA dropout on the adapter's input (off in the ZO probes, which run in eval mode)"""
    peft_target_modules: list[str] | str | None = None
    """LoRA: names of the modules to adapt (comma-separated or a YAML list; a name matches a module whose dotted
    path ends with it), or all-linear (every linear layer but the output head); default: peft's choice for the
    architecture (Llama: q_proj,v_proj), else all-linear"""
    peft_virtual_tokens: int = 5
    """prefix and prompt tuning: number of virtual tokens (MeZO's prefix: 5)"""

    def __post_init__(self) -> None:
        if isinstance(self.peft_target_modules, str):
            self.peft_target_modules = split_list(self.peft_target_modules.replace(" ", ","))
        if self.peft_target_modules is not None:
            self.peft_target_modules = [str(m) for m in self.peft_target_modules]
            if not self.peft_target_modules:
                raise L2ZOError("--peft-target-modules is empty: name modules (e.g. q_proj,v_proj) or leave it out")
        check_fields(self, positive=("peft_rank", "peft_alpha", "peft_virtual_tokens"))
        if not 0.0 <= self.peft_dropout < 1.0:
            raise L2ZOError(f"--peft-dropout must be in [0, 1), got {self.peft_dropout}")

    @property
    def enabled(self) -> bool:
        return self.peft != "none"

    def describe(self) -> str:
        """A short text of the adapter for logs and errors: 'full fine-tuning', 'LoRA r=8 alpha=16 ...'."""
        if self.peft == "none":
            return "full fine-tuning"
        if self.peft == "lora":
            targets = ",".join(self.peft_target_modules) if self.peft_target_modules else "default modules"
            return f"LoRA r={self.peft_rank} alpha={self.peft_alpha:g} on {targets}"
        return f"{self.peft} tuning with {self.peft_virtual_tokens} virtual tokens"


# MeZO's per-scheme hyperparameters (Malladi et al. 2023, Table 16, the OPT-13B grid; see
# the reference notes' baselines.md, MeZO): full lr {1e-6, 1e-7} eps 1e-3, prefix lr {1e-2, 1e-3} eps 1e-1, LoRA
# (r=8, alpha=16, q and v) lr {1e-4, 5e-5} eps 1e-2. l2zo's full default is the larger lr of the grid, so the
# adapters' are too. Prompt tuning is not in MeZO; it trains virtual-token embeddings as prefix tuning does, so it
# takes prefix's values.
MEZO_SCHEME_DEFAULTS: dict[str, dict[str, float]] = {
    "none": {},  # the optimizers' own defaults are MeZO's full-parameter values already
    "lora": {"lr": 1e-4, "eps": 1e-2},
    "prefix": {"lr": 1e-2, "eps": 1e-1},
    "prompt": {"lr": 1e-2, "eps": 1e-1},
}


def scheme_defaults(scheme: str, optimizer_defaults: dict[str, object], mezo_defaults: dict[str, object]) -> dict:
    """MeZO's lr and eps for ``scheme``, for an optimizer whose own defaults are MeZO's full-parameter lr and eps
    (``mezo_defaults``: MeZO, the learned optimizers, HiZOO, LOZO, Sparse MeZO, the ZO-SGD variants); {} for the
    others, whose published defaults are their own (ZO-Adam, FZOO, MeZO-SVRG, forward-grad, first-order)."""
    values = MEZO_SCHEME_DEFAULTS[scheme]
    if not values or any(optimizer_defaults.get(k) != mezo_defaults[k] for k in values):
        return {}
    return dict(values)
