"""PEFT adapters (LoRA, prefix tuning, prompt tuning) through the ``peft`` library, for ZO on the adapter only.

``apply_peft(model, args, seed)`` wraps a loaded causal LM and returns an ``AdaptedModel``:

* ``model`` is what the optimizer and the scorer run. Its only trainable tensors (``requires_grad``) are the
  adapter's, so ``l2zo.engine.blocks.partition`` makes its blocks of them alone and ZO never touches a base
  weight. For LoRA it is the transformers model itself with peft's LoRA layers injected (every forward argument
  the scorer uses, ``position_ids`` and ``logits_to_keep``, reaches it unchanged); for prefix and prompt tuning,
  whose virtual tokens live in ``PeftModel.forward``, it is ``PromptLearningLM`` around the ``PeftModel``.
* ``peft_model`` is the ``PeftModel``: ``save(folder)`` writes the adapter with its ``save_pretrained``.
* ``record`` describes the adapter (scheme, its layout options, the base model's architecture fingerprint); it
  is also set as ``model.l2zo_adapter``, where a learned optimizer reads it to check that an artifact was
  meta-trained for this base model and this adapter (``l2zo.learned.artifact.check_adapter``).

The adapter's random initialisation (LoRA's A, the virtual tokens) is drawn from ``seed`` under a forked RNG,
so it is the same on every rebuild of the run (a resumed run, compare's check build) and the global RNG is not
touched. Dropout modules peft adds are ``nn.Dropout``: the ZO probes' ``eval_mode`` switches them off.

Target modules default to peft's own table for the architecture (``config.model_type``; Llama: q_proj, v_proj,
as MeZO's LoRA), else to every linear layer but the output head (peft's "all-linear"): no model names here.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from l2zo.config.peft import PeftArgs
from l2zo.engine.blocks import ADAPTER_NAME, fingerprint, partition
from l2zo.errors import L2ZOError


@dataclass
class AdaptedModel:
    """A model with a PEFT adapter (see the module doc).

    Attributes:
        model: what the optimizer and the scorer run; only the adapter's tensors require grad.
        peft_model: the ``peft.PeftModel`` (``save_pretrained``).
        record: the adapter's description (also ``model.l2zo_adapter``).
    """

    model: nn.Module
    peft_model: Any
    record: dict[str, Any]

    def save(self, folder: str | Path) -> None:
        """Write the adapter (``adapter_config.json`` and its weights) with peft's ``save_pretrained``."""
        self.peft_model.save_pretrained(str(folder))


class PromptLearningLM(nn.Module):
    """A prefix- or prompt-tuning ``PeftModel`` with the forward the scorer calls (position_ids, logits_to_keep).

    Prefix tuning: peft offsets ``position_ids`` past its prefix itself. Prompt tuning: peft drops ``position_ids``
    (the virtual tokens precede the input), which would shift a left-padded sequence by its padding; here the
    virtual tokens take positions 0..P-1 and every real token its own position + P, handed to the base model.
    Logits: [N, T', V], T' = ``logits_to_keep`` or P + T (prompt tuning) or T (prefix); the last T' columns.
    """

    def __init__(self, peft_model: Any) -> None:
        super().__init__()
        from peft import PeftType

        self.peft = peft_model
        self.config = peft_model.get_base_model().config
        cfg = peft_model.active_peft_config
        self.num_virtual_tokens = int(cfg.num_virtual_tokens)
        self.prepends_tokens = cfg.peft_type == PeftType.PROMPT_TUNING

    def get_input_embeddings(self) -> nn.Module:
        return self.peft.get_input_embeddings()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> Any:
        """input_ids, attention_mask, position_ids: [N, T]."""
        kwargs: dict[str, Any] = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
        if not self.prepends_tokens or position_ids is None:
            return self.peft(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        p = self.num_virtual_tokens
        virtual = torch.arange(p, device=position_ids.device).expand(position_ids.shape[0], p)
        full = torch.cat([virtual, position_ids + p], dim=1)  # [N, P + T]

        def with_positions(_: nn.Module, args: tuple, kw: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
            return args, {**kw, "position_ids": full}

        handle = self.peft.get_base_model().register_forward_pre_hook(with_positions, with_kwargs=True)
        try:
            return self.peft(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            handle.remove()


def layer_names(model: nn.Module) -> list[str]:
    """The last name component of every leaf module with a weight matrix: what a LoRA target may name."""
    names = set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name and not list(module.children()) and isinstance(weight, Tensor) and weight.dim() == 2:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def _check_targets(model: nn.Module, targets: list[str]) -> None:
    """Every target names a module, matched as peft matches it (the whole dotted path or its end)."""
    modules = [name for name, _ in model.named_modules() if name]
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in modules):
            raise L2ZOError(f"bad --peft-target-modules {target!r}: no module of this model is named so; its layers "
                            f"with a weight matrix: {', '.join(layer_names(model))}")  # fmt: skip


def default_targets(model: nn.Module) -> list[str] | str:
    """peft's per-architecture LoRA targets for ``config.model_type``, else "all-linear"."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as TABLE

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = TABLE.get(model_type) if model_type else None
    return list(targets) if targets else "all-linear"


def peft_config(model: nn.Module, args: PeftArgs) -> Any:
    """The peft config of ``args`` for ``model`` (LoRA targets checked and defaulted)."""
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, TaskType

    if args.peft == "lora":
        targets: list[str] | str | None = args.peft_target_modules
        if targets == ["all-linear"]:  # peft's own: every linear layer but the output head
            targets = "all-linear"
        elif targets is not None:
            _check_targets(model, targets)
        return LoraConfig(task_type=TaskType.CAUSAL_LM, r=args.peft_rank, lora_alpha=args.peft_alpha,
                          lora_dropout=args.peft_dropout, target_modules=targets or default_targets(model))  # fmt: skip
    if args.peft == "prefix":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.peft_virtual_tokens)
    if args.peft == "prompt":
        # Virtual tokens start as the embeddings of random vocabulary tokens: at the scale of real inputs.
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.peft_virtual_tokens,
                                  prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB)  # fmt: skip
    raise L2ZOError(f"bad --peft {args.peft!r}; valid choices: lora, prefix, prompt, none")


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Random draws inside come from ``seed``; the global CPU RNG is as before afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def adapter_record(args: PeftArgs, config: Any, base_fingerprint: str) -> dict[str, Any]:
    """What binds a learned-optimizer artifact to an adapter: the scheme, its layout options and the base model."""
    record: dict[str, Any] = {"peft": args.peft, "base_fingerprint": base_fingerprint}
    if args.peft == "lora":
        targets = config.target_modules
        record.update(r=args.peft_rank, alpha=args.peft_alpha,
                      target_modules=sorted(targets) if not isinstance(targets, str) else targets)  # fmt: skip
    else:
        record["num_virtual_tokens"] = args.peft_virtual_tokens
    return record


def apply_peft(model: nn.Module, args: PeftArgs, seed: int = 0) -> AdaptedModel:
    """Wrap ``model`` (a loaded causal LM, every weight trainable) with the adapter ``args`` describes.

    The base weights are frozen (``requires_grad`` False) and stay bit-identical through a ZO run; the adapter
    is initialised from ``seed``. Raises ``L2ZOError`` for a target module the model lacks.
    """
    from peft import get_peft_model

    if not args.enabled:
        raise ValueError("apply_peft needs a PEFT scheme (args.peft is 'none')")
    base_fingerprint = fingerprint(partition(model))
    config = peft_config(model, args)
    with _seeded(seed), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notes peft triggers
        try:
            peft_model = get_peft_model(model, config, adapter_name=ADAPTER_NAME)
        except ValueError as exc:  # e.g. a target module peft cannot adapt (not a supported layer type)
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise L2ZOError(f"peft cannot build the {args.peft} adapter on this model: {first}") from None
    config = peft_model.active_peft_config
    record = adapter_record(args, config, base_fingerprint)
    train_model = peft_model.get_base_model() if args.peft == "lora" else PromptLearningLM(peft_model)
    train_model.eval()
    # Plain attributes (not modules): the artifact check and the artifact's manifest read them.
    train_model.l2zo_adapter = record
    name = getattr(model, "l2zo_name", None)
    if name is not None:
        train_model.l2zo_name = name
    return AdaptedModel(model=train_model, peft_model=peft_model, record=record)
