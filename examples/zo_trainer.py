"""A transformers Trainer script, switched to zeroth-order fine-tuning by one class and one argument.

Supervised fine-tuning of l2zo's tiny model (offline, shipped) on a synthetic task: each example is the prompt
followed by its answer, and the loss is the causal LM loss on the answer's tokens only. ``--backprop`` runs the
script as it was before the switch (``Trainer``, AdamW); the default runs MeZO through ``ZOTrainer``::

    python examples/zo_trainer.py                                                  # MeZO
    python examples/zo_trainer.py --zo-optimizer learned=checkpoints/tiny/zo-finetuner
    python examples/zo_trainer.py --zo-optimizer zo-adam:lr=1e-4
    python examples/zo_trainer.py --backprop                                       # the original script

The switch, in ``main``::

    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate)
    trainer = ZOTrainer(model=model, args=args, train_dataset=train, data_collator=collate, zo_optimizer="mezo")

Everything else (TrainingArguments, the lr schedule, logging, evaluate, save_model) is the Trainer's.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, Trainer, TrainingArguments

from l2zo.integrations.transformers import ZOTrainer
from l2zo.models import load_model
from l2zo.tasks import SplitSizes, get_task


def sft_examples(tokenizer: PreTrainedTokenizerBase, task: str, n: int, seed: int, split: str = "train") -> list[dict]:
    """``n`` examples of ``task`` as {input_ids, labels}: prompt + answer tokens, labels -100 on the prompt."""
    sizes = SplitSizes(train=n, dev=n, test=0) if split == "dev" else SplitSizes(train=n, dev=0, test=0)
    data = get_task(task).load(None, sizes, seed=seed)
    rows = []
    for ex in getattr(data, split):
        prompt = tokenizer(ex.prompt)["input_ids"]
        answer = tokenizer(ex.candidates[ex.label], add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return rows


def collate_fn(pad_id: int):
    """Right padding to the longest row: input_ids with ``pad_id``, labels with -100, and the attention mask."""

    def collate(rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        out = {"input_ids": [], "labels": [], "attention_mask": []}
        for r in rows:
            pad = width - len(r["input_ids"])
            out["input_ids"].append(r["input_ids"] + [pad_id] * pad)
            out["labels"].append(r["labels"] + [-100] * pad)
            out["attention_mask"].append([1] * len(r["input_ids"]) + [0] * pad)
        return {k: torch.tensor(v) for k, v in out.items()}

    return collate


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zo-optimizer", default="mezo", help="NAME[=ARTIFACT][:key=value...], as l2zo compare")
    parser.add_argument("--backprop", action="store_true", help="the original script: Trainer with AdamW")
    parser.add_argument("--task", default="synth-sentiment")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-4 (ZO), 1e-3 (AdamW)")
    parser.add_argument("--train", type=int, default=512, help="training examples")
    parser.add_argument("--dev", type=int, default=128, help="dev examples (loss before and after)")
    parser.add_argument("--output-dir", default="runs/zo-trainer")
    opts = parser.parse_args(argv)

    loaded = load_model("tiny")
    model, tokenizer = loaded.model, loaded.tokenizer
    train = sft_examples(tokenizer, opts.task, opts.train, seed=0)
    dev = sft_examples(tokenizer, opts.task, opts.dev, seed=0, split="dev")
    collate = collate_fn(tokenizer.pad_token_id)
    args = TrainingArguments(
        output_dir=opts.output_dir,
        max_steps=opts.steps,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        learning_rate=opts.lr if opts.lr is not None else (1e-3 if opts.backprop else 1e-4),
        lr_scheduler_type="linear",
        logging_steps=max(1, opts.steps // 10),
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=not torch.cuda.is_available(),
    )
    if opts.backprop:
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate)
    else:
        trainer = ZOTrainer(
            model=model, args=args, train_dataset=train, data_collator=collate, zo_optimizer=opts.zo_optimizer
        )
    before = trainer.evaluate(dev)["eval_loss"]
    trainer.train()
    after = trainer.evaluate(dev)["eval_loss"]
    print(f"dev loss {before:.4f} -> {after:.4f}")
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
