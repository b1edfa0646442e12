"""``l2zo compare`` (run several optimizers on the same batches, then tables and plots) and
``l2zo report`` (the same tables and plots rebuilt from a folder's TensorBoard events alone)."""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse import Namespace

from l2zo.cli.parser import CommandParser, command_parser
from l2zo.compare.spec import CompareConfig
from l2zo.config.parser import config_parser, from_namespace
from l2zo.errors import L2ZOError

COMPARE_HELP = "run several optimizers on the same batches and seeds; tables and plots"
REPORT_HELP = "rebuild a compare's tables and plots from its TensorBoard event files"

_EXAMPLE = """example:
  l2zo compare --model tiny --task synth-sentiment --optimizers mezo,zo-adam:lr=1e-4,hizoo \\
      --steps 50 --seeds 0,1 --logdir runs/cmp
  l2zo compare ... --optimizers mezo,mezo:lr=1e-4,learned=artifacts/zo --opt-config opt.yaml
  l2zo compare ... --sweep lr=1e-5,1e-4,1e-3      # each optimizer at each lr, picked on dev loss
  l2zo compare ... --lr-grid 1e-5,2e-5,5e-5 --tune-steps 50 --seeds 0,1,2 --baseline mezo
                                                  # lr tuned on seed 0 (50 steps), then 3 paired seeds
  l2zo compare --config cmp.yaml                  # optimizers: [{name: mezo, lr: 1e-4}, {name: zo-adam}]
  l2zo report runs/cmp                            # rebuild summary.md/.csv and PNGs from the events"""


def register(cli: CommandParser) -> None:
    p = config_parser(CompareConfig, description=COMPARE_HELP, epilog=_EXAMPLE)
    p.add_argument("--overwrite", action="store_true", help="replace the experiment in --logdir (all of it)")
    p.add_argument("--resume", action="store_true", help="continue the experiment in --logdir: keep the finished runs")
    cli.add_command("compare", p, run_compare_cmd, help=COMPARE_HELP)

    r = command_parser(description=REPORT_HELP)
    r.add_argument("logdir", type=str, help="experiment folder (runs in <logdir>/<run>/seed<k>/)")
    r.add_argument("--select", choices=("final", "best"), default=None,
                   help="sweep selection on the final or best dev loss (default: what the compare used)")  # fmt: skip
    cli.add_command("report", r, run_report, help=REPORT_HELP)


def run_compare_cmd(args: Namespace) -> int:
    from l2zo.compare.run import run_compare
    from l2zo.train.strategies import is_primary

    cfg = from_namespace(CompareConfig, args)
    report = run_compare(cfg, overwrite=args.overwrite, resume=args.resume)
    if not is_primary(cfg.dist):  # every process runs the command; rank 0 reports
        return 0
    print_report(report, Path(cfg.logdir))
    failed = sum(r["status"] != "ok" for r in report["records"])
    if failed:
        print(f"l2zo: {failed} of {len(report['records'])} runs failed; see the status column", file=sys.stderr)
    return 1 if failed else 0


def run_report(args: Namespace) -> int:
    from l2zo.compare.summary import write_report

    root = Path(args.logdir)
    if not root.is_dir():
        raise L2ZOError(f"no such folder: {root}")
    print_report(write_report(root, args.select), root)
    return 0


def print_report(report: dict, root: Path) -> None:
    md = report["markdown"]
    print()
    print(md.split("\n- ")[0].rstrip())  # the header and the main table
    if "\n## Paired against" in md:  # and the paired table, without its notes
        print("\n## Paired against" + md.split("\n## Paired against", 1)[1].split("\n- ")[0].rstrip())
    print(f"\nwrote {root / 'summary.md'}, {root / 'summary.csv'} and {len(report['plots'])} plots "
          f"(tensorboard --logdir {root})")  # fmt: skip
