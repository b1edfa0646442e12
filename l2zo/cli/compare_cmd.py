"""``l2zo compare`` (run several optimizers on the same batches, then tables and plots) and
``l2zo report`` (the same tables and plots rebuilt from a folder's TensorBoard events alone)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from l2zo.compare.spec import COMPARE_HELP, CompareConfig
from l2zo.config import add_config_arguments, build_config
from l2zo.errors import L2ZOError

_NOT_CONFIG = ("command", "func", "config", "overwrite", "resume")

_EXAMPLE = """example:
  l2zo compare --model tiny --task synth-sentiment --optimizers mezo,zo-adam:lr=1e-4,hizoo \\
      --steps 50 --seeds 0,1 --logdir runs/cmp
  l2zo compare ... --optimizers mezo,mezo:lr=1e-4,learned=artifacts/zo --opt-config opt.yaml
  l2zo compare ... --sweep lr=1e-5,1e-4,1e-3      # each optimizer at each lr, picked on dev loss
  l2zo report runs/cmp                            # rebuild summary.md/.csv and PNGs from the events"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="run several optimizers on the same batches and seeds; tables and plots",
                       epilog=_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--config", default=None, help="YAML file with the same keys as the flags (flags win)")
    p.add_argument("--overwrite", action="store_true", help="replace the experiment in --logdir (all of it)")
    p.add_argument("--resume", action="store_true", help="continue the experiment in --logdir: keep the finished runs")
    add_config_arguments(p, CompareConfig, COMPARE_HELP)
    p.set_defaults(func=run_compare_cmd)

    r = sub.add_parser("report", help="rebuild a compare's tables and plots from its TensorBoard event files")
    r.add_argument("logdir", help="experiment folder (runs in <logdir>/<run>/seed<k>/)")
    r.add_argument("--select", choices=("final", "best"), default=None,
                   help="sweep selection on the final or best dev loss (default: what the compare used)")  # fmt: skip
    r.set_defaults(func=run_report)


def run_compare_cmd(args: argparse.Namespace) -> int:
    from l2zo.compare.run import run_compare

    overrides = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}
    cfg = build_config(CompareConfig, args.config, overrides)
    report = run_compare(cfg, overwrite=args.overwrite, resume=args.resume)
    print_report(report, Path(cfg.logdir))
    failed = sum(r["status"] != "ok" for r in report["records"])
    if failed:
        print(f"l2zo: {failed} of {len(report['records'])} runs failed; see the status column", file=sys.stderr)
    return 1 if failed else 0


def run_report(args: argparse.Namespace) -> int:
    from l2zo.compare.summary import write_report

    root = Path(args.logdir)
    if not root.is_dir():
        raise L2ZOError(f"no such folder: {root}")
    print_report(write_report(root, args.select), root)
    return 0


def print_report(report: dict, root: Path) -> None:
    print()
    print(report["markdown"].split("\n- ")[0].rstrip())  # the header and the main table
    print(f"\nwrote {root / 'summary.md'}, {root / 'summary.csv'} and {len(report['plots'])} plots "
          f"(tensorboard --logdir {root})")  # fmt: skip
