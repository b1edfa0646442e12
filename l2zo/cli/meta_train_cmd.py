"""``l2zo meta-train``: flags and ``--config FILE`` keys are the fields of ``MetaTrainConfig``."""

from __future__ import annotations

from jsonargparse import Namespace

from l2zo.cli.parser import CommandParser
from l2zo.config.parser import config_parser, from_namespace
from l2zo.learned.meta_config import MetaTrainConfig

HELP = "meta-train a learned ZO optimizer (variance net) and save its artifact"


def register(cli: CommandParser) -> None:
    parser = config_parser(MetaTrainConfig, description=HELP)
    parser.add_argument("--resume", type=str | None, default=None, metavar="CKPT",
                        help="resume from a Lightning checkpoint of this run, e.g. LOGDIR/checkpoints/last.ckpt")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a previous run in --logdir and the --output folder")  # fmt: skip
    cli.add_command("meta-train", parser, run, help=HELP)


def run(args: Namespace) -> int:
    import json

    from l2zo.learned.artifact import read_manifest
    from l2zo.train.meta_train import run_meta_train
    from l2zo.train.strategies import is_primary

    cfg = from_namespace(MetaTrainConfig, args)
    path = run_meta_train(cfg, resume=args.resume, overwrite=args.overwrite)
    if not is_primary(cfg.dist):  # every process runs the command; rank 0 reports
        return 0
    meta = read_manifest(path)["meta_training"]
    print(f"artifact: {path}")
    print(f"meta-steps {meta['steps']} ({meta['objective']}), meta-loss {meta['initial_meta_loss']:.4f} -> "
          f"{meta['final_meta_loss']:.4f} (mean of the first/last 50 steps), {meta['wall_time_s']:.0f} s")  # fmt: skip
    print(f"run folder: {cfg.logdir} (tensorboard --logdir {cfg.logdir}); record: {json.dumps(meta['tasks'])}")
    return 0
