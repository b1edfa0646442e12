"""The quick start's main job, on the embedded tiny world (offline, a few minutes on 2 CPU cores).

It fine-tunes the project's own pretrained ``tiny`` model with MeZO on a synthetic task that is held
out of meta-training, and prints where the TensorBoard run is.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from l2zo.cli.report import print_finetune_summary
from l2zo.config import FinetuneConfig
from l2zo.tasks.synthetic import SYNTH_HELD_OUT
from l2zo.train.finetune import run_finetune

# MeZO's learning rate for a 1M-parameter model is far larger than for a billion-parameter one:
# the ZO step's variance grows with the parameter count.
DEMO_LR = 1e-3


def run_demo(logdir: str = "runs/demo", steps: int = 300) -> int:
    task = SYNTH_HELD_OUT[0]
    print(f"l2zo demo: MeZO fine-tunes `tiny` on the held-out task {task} ({steps} steps)")
    cfg = FinetuneConfig(
        model="tiny",
        task=task,
        optimizer="mezo",
        lr=DEMO_LR,
        eps=1e-3,
        steps=steps,
        batch_size=16,
        eval_every=max(steps // 4, 1),
        num_train=1000,
        num_dev=200,
        num_test=500,
        logdir=str(Path(logdir) / f"mezo-{task}"),
    )
    summary = run_finetune(cfg, overwrite=True)
    print_finetune_summary(summary, cfg.logdir)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the quick start: fine-tune the embedded tiny model on a held-out synthetic task")
    p.add_argument("--logdir", default="runs/demo", help="where the runs go (default: runs/demo)")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps (default: 300)")
    p.set_defaults(func=lambda args: run_demo(logdir=args.logdir, steps=args.steps))
