"""``l2zo meta-train``: flags mirror ``MetaTrainConfig``; ``--config FILE`` gives the same keys in YAML."""

from __future__ import annotations

import argparse

from l2zo.config import add_config_arguments, build_config
from l2zo.learned.meta_config import META_FIELD_HELP, MetaTrainConfig

_NOT_CONFIG = ("command", "func", "config", "overwrite", "resume")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("meta-train", help="meta-train a learned ZO optimizer (variance net) and save its artifact")
    p.add_argument("--config", default=None, help="YAML file with the same keys as the flags (flags win)")
    p.add_argument("--resume", default=None, metavar="CKPT",
                   help="resume from a Lightning checkpoint of this run, e.g. LOGDIR/checkpoints/last.ckpt")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --logdir and the --output folder")
    add_config_arguments(p, MetaTrainConfig, META_FIELD_HELP)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from l2zo.learned.artifact import read_manifest
    from l2zo.train.meta_train import run_meta_train

    overrides = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}
    cfg = build_config(MetaTrainConfig, args.config, overrides)
    path = run_meta_train(cfg, resume=args.resume, overwrite=args.overwrite)
    meta = read_manifest(path)["meta_training"]
    print(f"artifact: {path}")
    print(f"meta-steps {meta['steps']} ({meta['objective']}), meta-loss {meta['initial_meta_loss']:.4f} -> "
          f"{meta['final_meta_loss']:.4f} (mean of the first/last 50 steps), {meta['wall_time_s']:.0f} s")  # fmt: skip
    print(f"run folder: {cfg.logdir} (tensorboard --logdir {cfg.logdir}); record: {json.dumps(meta['tasks'])}")
    return 0
