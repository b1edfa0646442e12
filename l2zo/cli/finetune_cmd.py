"""``l2zo finetune``: flags and ``--config FILE`` keys are the fields of ``FinetuneConfig``."""

from __future__ import annotations

from jsonargparse import Namespace

from l2zo.cli.parser import CommandParser
from l2zo.config import FinetuneConfig
from l2zo.config.parser import config_parser, from_namespace

HELP = "fine-tune a model on a task with a ZO optimizer"


def register(cli: CommandParser) -> None:
    parser = config_parser(FinetuneConfig, description=HELP)
    parser.add_argument("--overwrite", action="store_true", help="replace a previous run in --logdir")
    parser.add_argument("--resume", action="store_true",
                        help="continue the stopped run in --logdir from LOGDIR/checkpoints/last.ckpt, with the run's "
                        "config (e.g. --config LOGDIR/config.yaml --resume); only --steps, --checkpoint-every, "
                        "--progress, --save-model and the devices may change (a run of many processes resumes "
                        "on one)")  # fmt: skip
    cli.add_command("finetune", parser, run, help=HELP)


def run(args: Namespace) -> int:
    from l2zo.cli.report import print_finetune_summary
    from l2zo.train.finetune import run_finetune
    from l2zo.train.strategies import is_primary

    cfg = from_namespace(FinetuneConfig, args)
    summary = run_finetune(cfg, overwrite=args.overwrite, resume=args.resume)
    if not is_primary(cfg.dist):  # every process runs the command; rank 0 reports
        return 0
    print_finetune_summary(summary, cfg.logdir)
    if summary.get("resumed_from_step") is not None:
        print(f"  resumed from step {summary['resumed_from_step']} (checkpoint removed: the run is finished)")
    return 0
