"""``l2zo``: one subcommand per module listed in ``COMMANDS``; each module has ``register(subparsers)``.

Every ending is one line on stderr and an exit status (``l2zo.utils.runstatus``): a user error or a failed
run (``L2ZOError``) exits 2, SIGTERM 143 and SIGINT 130 (``RunInterrupted``), an unexpected exception 1
(its traceback only with ``L2ZO_TRACEBACK=1``); run folders record the same in summary.json.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from l2zo.cli.parser import CommandParser
from l2zo.errors import L2ZOError
from l2zo.utils.runstatus import RunInterrupted, one_line

# Each module defines register(cli): it adds its command(s) with CommandParser.add_command.
COMMANDS = (
    "l2zo.cli.finetune_cmd",
    "l2zo.cli.compare_cmd",
    "l2zo.cli.meta_train_cmd",
    "l2zo.cli.demo",
    "l2zo.cli.listing",
    "l2zo.cli.inspect_cmd",
    "l2zo.cli.bench_cmd",
    "l2zo.cli.probe_blocks_cmd",
)


def _quiet_libraries() -> None:
    # Lightning and transformers narrate every run (accelerator, tips, tied weights); l2zo prints its own summary.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    # The ZO module keeps dropout off on purpose and moves its own batches; Lightning warns about both.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    warnings.filterwarnings("ignore", message=r".*overridden `transfer_batch_to_device`.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(message)s")


def build_parser() -> CommandParser:
    parser = CommandParser(prog="l2zo", description="Learned zeroth-order optimizers for fine-tuning LLMs.")
    for name in COMMANDS:
        importlib.import_module(name).register(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_libraries()
    try:
        args = build_parser().parse_args(argv)  # a bad command line is an L2ZOError too
        return int(args.func(args))
    except L2ZOError as exc:
        print(f"l2zo: error: {exc}", file=sys.stderr)
        return 2
    except RunInterrupted as exc:
        print(f"l2zo: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("l2zo: interrupted by SIGINT", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("L2ZO_TRACEBACK"):
            raise
        print(f"l2zo: internal error: {one_line(exc)} (L2ZO_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
