"""``l2zo finetune``: flags mirror ``FinetuneConfig``; ``--config FILE`` gives the same keys in YAML."""

from __future__ import annotations

import argparse

from l2zo.config import FIELD_HELP, FinetuneConfig, add_config_arguments, build_config

_NOT_CONFIG = ("command", "func", "config", "overwrite")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model on a task with a ZO optimizer")
    p.add_argument("--config", default=None, help="YAML file with the same keys as the flags (flags win)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --logdir")
    add_config_arguments(p, FinetuneConfig, FIELD_HELP)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from l2zo.cli.report import print_finetune_summary
    from l2zo.train.finetune import run_finetune

    overrides = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}
    cfg = build_config(FinetuneConfig, args.config, overrides)
    summary = run_finetune(cfg, overwrite=args.overwrite)
    print_finetune_summary(summary, cfg.logdir)
    return 0
