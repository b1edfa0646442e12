"""``l2zo probe-blocks``: per-block statistics (G_b, noise, tau_b) of a model on a task, and the predicted gain R of
each allocation (MeZO, the untrained net, a permuted one, per-block-const, meta-trained artifacts, oracles).

Writes OUTPUT/probe.json, OUTPUT/probe.md and OUTPUT/sigma/<allocation>.json; each sigma file runs as
``fixed-sigma:sigma_file=FILE`` in ``l2zo compare`` to measure the allocation.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from l2zo.cli.parser import CommandParser, command_parser
from l2zo.errors import L2ZOError

_EXAMPLE = """example:
  l2zo probe-blocks --model tiny-derived --task synth-color --artifact checkpoints/tiny/zo-finetuner \\
      --states 0,100 --output runs/probe-blocks/tiny
  l2zo compare --model tiny-derived --task synth-color --sweep lr=1e-4,2e-4 \\
      --optimizers "mezo,fixed-sigma:sigma_file=runs/probe-blocks/tiny/sigma/gsl.json\""""


class _IntList:
    """argparse type of --states: "0,100,200" -> [0, 100, 200]; named so --help shows a readable type."""

    def __call__(self, text: str | list[int]) -> list[int]:
        if isinstance(text, list):  # jsonargparse re-applies the type to a parsed value when it checks the namespace
            return [int(x) for x in text]
        try:
            return [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected integers like 0,100,200, got {text!r}") from None

    def __repr__(self) -> str:
        return "comma-separated integers"


_int_list = _IntList()


_HELP = "per-block gradient/curvature statistics and the predicted gain of per-block allocations (MeZO, nets, oracles)"


def register(cli: CommandParser) -> None:
    p = command_parser(description=_HELP)
    p.epilog, p.formatter_class = _EXAMPLE, argparse.RawDescriptionHelpFormatter
    a = p.add_argument
    a("--model", default="tiny", help="model (tiny, tiny-derived, smollm2-135m, a folder ...)")
    a("--task", default="synth-sentiment", help="task name or user task YAML")
    a("--data-dir", default=None, help="local data root; null reads the Hugging Face hub")
    a("--batch-size", type=int, default=16, help="examples per batch: the fine-tune's")
    a("--max-length", type=int, default=256, help="max tokens per sequence")
    a("--num-train", type=int, default=1000, help="train examples sampled, as in compare")
    a("--data-seed", type=int, default=0, help="seed of the split sampling")
    a("--seed", type=int, default=0, help="seed of the batches, probes and MeZO trajectory")
    a("--artifact", action="append", default=[], dest="artifacts",
      help="a meta-trained learned-optimizer folder; repeat for several")  # fmt: skip
    a("--states", type=_int_list, default="0", help="MeZO steps at which to measure, e.g. 0,100,200")
    a("--mezo-lr", type=float, default=1e-4, help="lr of the MeZO trajectory between states")
    a("--eps", type=float, default=1e-3, help="ZO eps for the trajectory and the nets")
    a("--pairs", type=int, default=4, help="independent batch pairs per state")
    a("--probes", type=int, default=8, help="Hutchinson probes per pair for tau_b")
    a(
        "--ghg-probes",
        type=int,
        default=2,
        dest="gHg_probes",
        help="sign-mixed HVPs per pair for g^T H_b g",
    )
    a("--fisher-samples", type=int, default=4, help="sampled-label backwards per batch for the Fisher")
    a(
        "--curvature",
        default="auto",
        choices=("auto", "fisher", "hessian"),
        help="curvature of the oracles and the K-step model; auto: the Fisher where the task allows",
    )
    a("--horizon", type=int, default=300, help="K of the K-step prediction")
    a(
        "--gsl-temperature",
        type=float,
        default=None,
        help="GS-L oracle: s^2 ~ (G/tau)^(1/T) (default: the T in 1/8..4 the K-step model predicts best)",
    )
    a(
        "--hizoo-gamma",
        type=float,
        default=None,
        help="HiZOO-like oracle: s^2 ~ (n/tau)^gamma (default: the gamma in 1/4..1 the K-step model predicts best)",
    )
    a("--wf-eta", type=float, default=None, help="water-filling's fixed eta (default: MeZO's one-step optimum)")
    a("--net-seed", type=int, default=0, help="seed of the untrained net (learned-random's net_seed)")
    a("--perm-seed", type=int, default=0, help="seed of the permutation of the untrained net's sigmas")
    a("--settle", type=int, default=6, help="lr-0 steps to settle a net's recurrent inputs")
    a("--device", default="cpu", choices=("auto", "cpu", "cuda"), help="device")
    a("--output", default="runs/probe-blocks", help="output folder")
    a("--overwrite", action="store_true", help="replace an existing output folder")
    cli.add_command("probe-blocks", p, run, help=_HELP)


def run(args: argparse.Namespace) -> int:
    from l2zo.blockstats.probe import ProbeConfig, run_probe
    from l2zo.blockstats.report import allocations_table, write_outputs

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise L2ZOError(f"{out} already exists; pick another --output or pass --overwrite")
    keys = {f for f in ProbeConfig.__dataclass_fields__}
    cfg = ProbeConfig(**{k: v for k, v in vars(args).items() if k in keys})
    for artifact in cfg.artifacts:
        if not (Path(artifact) / "l2zo_artifact.json").is_file():
            raise L2ZOError(f"--artifact {artifact} is not a learned-optimizer folder (no l2zo_artifact.json)")
    result = run_probe(cfg)
    write_outputs(result, out, overwrite=args.overwrite)
    print(allocations_table(result))
    print(f"\nwrote {out / 'probe.md'}, {out / 'probe.json'} and {len(result['sigma'])} sigma files in {out / 'sigma'}")
    return 0
