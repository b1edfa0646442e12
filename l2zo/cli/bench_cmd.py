"""``l2zo bench``: a ZO step against two forward passes and MeZO's reference loop, memory against inference.

l2zo bench --model smollm2-135m --batch-size 16 --seq-len 64 --precision bf16-mixed --json out.json
"""

from __future__ import annotations

import argparse

from l2zo.bench.config import BENCH_FIELD_HELP, BenchConfig
from l2zo.config import add_config_arguments, build_config

_NOT_CONFIG = ("command", "func", "config")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="time a ZO step against two forward passes and MeZO's loop; peak memory vs inference"
    )
    p.add_argument("--config", default=None, help="YAML file with the same keys as the flags (flags win)")
    add_config_arguments(p, BenchConfig, BENCH_FIELD_HELP)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from l2zo.bench.run import format_table, run_bench
    from l2zo.utils.io import write_json_atomic

    overrides = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}
    cfg = build_config(BenchConfig, args.config, overrides)
    record = run_bench(cfg)
    print(format_table(record))
    if cfg.json:
        write_json_atomic(cfg.json, record)
        print(f"wrote {cfg.json}")
    return 0
