"""``l2zo bench``: a ZO step against two forward passes and MeZO's reference loop, memory against inference.

l2zo bench --model smollm2-135m --batch-size 16 --seq-len 64 --precision bf16-mixed --json out.json
"""

from __future__ import annotations

from jsonargparse import Namespace

from l2zo.bench.config import BenchConfig
from l2zo.cli.parser import CommandParser
from l2zo.config.parser import config_parser, from_namespace

HELP = "time a ZO step against two forward passes and MeZO's loop; peak memory vs inference"


def register(cli: CommandParser) -> None:
    cli.add_command("bench", config_parser(BenchConfig, description=HELP), run, help=HELP)


def run(args: Namespace) -> int:
    from l2zo.bench.run import format_table, run_bench
    from l2zo.utils.io import write_json_atomic

    cfg = from_namespace(BenchConfig, args)
    record = run_bench(cfg)
    print(format_table(record))
    if cfg.json:
        write_json_atomic(cfg.json, record)
        print(f"wrote {cfg.json}")
    return 0
