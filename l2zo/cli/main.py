"""``l2zo``: one subcommand per module listed in ``COMMANDS``; each module has ``register(subparsers)``.

User errors (``L2ZOError``) print one line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from l2zo.errors import L2ZOError

# Each module defines register(subparsers) and sets `func` on its parser(s).
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="l2zo", description="Learned zeroth-order optimizers for fine-tuning LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except L2ZOError as exc:
        print(f"l2zo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("l2zo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
