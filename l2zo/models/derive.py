"""Derivatives of a base model: the same architecture, other weights, made by continued causal-LM training.

A derivative keeps every parameter name and shape of its base, so its architecture fingerprint
(``l2zo.engine.blocks.fingerprint``) is the base's: a learned-optimizer artifact meta-trained on the
base loads onto it (``l2zo.learned.artifact.load_artifact`` warns about the other name and proceeds).
``scripts/make_derivative.py`` makes one from unlabeled SST-2 sentences.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from l2zo.config import PRECISIONS, check_choice
from l2zo.errors import L2ZOError
from l2zo.models.loading import LoadedModel
from l2zo.models.tiny import Schedule, token_blocks, train_lm
from l2zo.utils.io import atomic_dir, write_json_atomic

INFO_FILE = "derive_info.json"


@torch.no_grad()
def heldout_loss(
    model: transformers.PreTrainedModel, blocks: torch.Tensor, *, batch_size: int, precision: str
) -> float:
    """Mean next-token cross-entropy (fp32) over ``blocks`` [N, T], every block weighing the same.

    Runs the forward under the same autocast as training, so the initial and final numbers compare
    like with like.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, blocks.shape[0], batch_size):
        batch = blocks[i : i + batch_size].to(device)  # [b, T]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            logits = model(input_ids=batch).logits  # [b, T, V]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
        )
        total += loss.item() * batch.shape[0]  # every block has T - 1 targets, so this is the mean over tokens
    model.train(was_training)
    return total / blocks.shape[0]


def derive_by_lm(
    loaded: LoadedModel,
    texts: list[str],
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    seed: int,
    precision: str,
    eval_blocks: int = 8,
) -> dict[str, Any]:
    """Continue the causal-LM training of ``loaded.model`` in place on ``texts`` (first-order AdamW).

    The texts, each followed by eos, are packed into contiguous [N, seq_len] token blocks
    (``l2zo.models.tiny.token_blocks``); the last ``max(1, min(eval_blocks, N // 4))`` blocks are held
    out and the rest trained on with ``l2zo.models.tiny.train_lm``: random batches of ``batch_size`` blocks
    (seeded), AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), linear warmup over the first
    10% of the steps then cosine decay to 0.1 x ``lr``, gradient norm clipped to 1. ``precision``
    "bf16-mixed" is bf16 autocast over the fp32 weights; losses are always fp32.

    Returns a JSON-ready record: the held-out LM loss before and after, the first / last training
    losses, steps, seconds and token counts.

    Raises:
        L2ZOError: a bad precision or size, or texts too short for two blocks of ``seq_len`` tokens.
    """
    check_choice("precision", precision, PRECISIONS)
    for key, value in (("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len)):
        if value <= 0:
            raise L2ZOError(f"--{key.replace('_', '-')} must be positive, got {value}")
    if seq_len < 2:
        raise L2ZOError(f"--seq-len must be at least 2 (one next-token target), got {seq_len}")
    if not math.isfinite(lr) or lr <= 0:
        raise L2ZOError(f"--lr must be a positive number, got {lr}")
    if loaded.tokenizer.eos_token_id is None:
        raise L2ZOError(
            f"the tokenizer of {loaded.name!r} has no eos token, which separates the packed texts; "
            "use a model whose tokenizer defines one"
        )
    t0 = time.perf_counter()
    blocks = token_blocks(loaded.tokenizer, texts, seq_len)  # [N, seq_len]
    if blocks.shape[0] < 2:
        raise L2ZOError(
            f"{len(texts)} texts give {blocks.shape[0]} block(s) of {seq_len} tokens; at least 2 are needed "
            "(one to train on, one held out): pass more texts or a shorter --seq-len"
        )
    # Held out from the end: the caller's texts are already in a seeded random order (task sampling).
    n_eval = max(1, min(eval_blocks, blocks.shape[0] // 4))
    train_blocks, eval_set = blocks[:-n_eval], blocks[-n_eval:]
    model = loaded.model
    initial = heldout_loss(model, eval_set, batch_size=batch_size, precision=precision)
    # Warmup over 10% of the steps, at least one: a short run still takes full-size steps.
    sched = Schedule("derive", steps=steps, n_docs=len(texts), batch=batch_size, seq_len=seq_len, lr=lr,
                     warmup=max(1, steps // 10), seed=seed)  # fmt: skip
    t1 = time.perf_counter()
    losses = train_lm(model, train_blocks, sched, precision=precision)
    train_seconds = time.perf_counter() - t1
    final = heldout_loss(model, eval_set, batch_size=batch_size, precision=precision)
    if not all(math.isfinite(v) for v in (initial, final, *losses)):
        raise L2ZOError(
            f"continued LM training diverged (held-out loss {initial:.4g} -> {final:.4g}, last training loss "
            f"{losses[-1]:.4g}); lower --lr or use --precision 32"
        )
    tail = losses[-10:]
    return {
        "method": "continued causal-LM training, first-order AdamW (l2zo.models.derive.derive_by_lm)",
        "steps": steps,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "lr": lr,
        "warmup_steps": sched.warmup,
        "lr_schedule": "linear warmup, cosine decay to 0.1 x lr",
        "weight_decay": 0.1,  # train_lm's, on matrices only
        "seed": seed,
        "precision": precision,
        "n_texts": len(texts),
        "corpus_tokens": blocks.numel(),
        "train_blocks": train_blocks.shape[0],
        "heldout_blocks": n_eval,
        "tokens_seen": steps * batch_size * seq_len,
        "initial_heldout_lm_loss": round(initial, 4),
        "final_heldout_lm_loss": round(final, 4),
        "first_train_lm_loss": round(losses[0], 4),
        "final_train_lm_loss": round(sum(tail) / len(tail), 4),  # mean of the last 10 steps
        "train_seconds": round(train_seconds, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "threads": torch.get_num_threads(),
        "device": str(next(model.parameters()).device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def save_derivative(loaded: LoadedModel, folder: Path, record: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Write ``loaded``'s model and tokenizer (``save_pretrained``) and ``derive_info.json`` into ``folder``.

    ``derive_info.json`` holds the base model (name, what was loaded, revision, source) and ``record``.
    The folder is written beside ``folder`` under a temporary name and renamed into place when complete,
    so a killed run leaves no half-written derivative; with ``overwrite`` an existing folder is replaced
    only then. ``load_model(str(folder))`` loads the result.

    Raises:
        L2ZOError: ``folder`` exists and ``overwrite`` is False.
    """
    folder = Path(folder)
    refuse = L2ZOError(
        f"{folder} already exists; pass --overwrite (overwrite=True) to replace it, or choose another --out"
    )
    if folder.exists() and not overwrite:
        raise refuse
    info = {
        "base_model": {
            "name": loaded.name,
            "name_or_path": loaded.name_or_path,
            "revision": loaded.revision,
            "source": loaded.source,
        },
        "derive": record,
    }
    try:
        # A GGUF base saves as an ordinary checkpoint: load_model drops the GGUF quantizer (weights are fp32).
        with atomic_dir(folder, overwrite=overwrite) as tmp:
            loaded.model.save_pretrained(tmp)
            loaded.tokenizer.save_pretrained(tmp)
            write_json_atomic(tmp / INFO_FILE, info)
    except FileExistsError as e:  # created by someone else since the check above
        raise refuse from e
    return folder
