"""``l2zo probe-blocks``: per-block statistics (G_b, noise, tau_b) of a model on a task, and the predicted gain R of
each allocation (MeZO, the untrained net, a permuted one, per-block-const, meta-trained artifacts, oracles).

Writes OUTPUT/probe.json, OUTPUT/probe.md and OUTPUT/sigma/<allocation>.json; each sigma file runs as
``fixed-sigma:sigma_file=FILE`` in ``l2zo compare`` to measure the allocation.

The folder is the probe's from the start: OUTPUT/probe_config.json (the settings), OUTPUT/status.json (running,
then ok, failed, interrupted or error, with how far it got) and OUTPUT/pairs/ (each measured pair, saved when
done). ``--resume`` continues an unfinished probe from its saved pairs, or re-scores a finished one (other
``--artifact``, ``--wf-eta``, ``--curvature`` ...) without measuring again; the settings the pairs depend on must
be the same.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

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
    a("--zo-probes", type=int, default=0,
      help="also measure G_b with forward passes only on each batch pair (block-restricted antithetic probes, "
           "4 x this x blocks forwards a pair), against the backprop G; 0: not")  # fmt: skip
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
    a("--resume", action="store_true",
      help="continue the probe in --output from its saved pairs, or re-score a finished one")  # fmt: skip
    cli.add_command("probe-blocks", p, run, help=_HELP)


CONFIG_FILE, STATUS_FILE, PAIRS_DIR = "probe_config.json", "status.json", "pairs"


def _check_folder(out: Path, cfg_dict: dict[str, Any], overwrite: bool, resume: bool) -> None:
    """Refuse what cannot be done with ``out`` before anything is written (one line, exit 2)."""
    from l2zo.blockstats.probe import MEASURE_KEYS

    if overwrite and resume:
        raise L2ZOError("--resume continues the probe in --output and --overwrite replaces it: pass one of them")
    if out.exists() and not out.is_dir():
        raise L2ZOError(f"--output {out} is a file; pick another --output")
    if not out.exists() or not any(out.iterdir()):
        if resume:
            raise L2ZOError(f"--resume: there is no probe in {out} to resume; check --output")
        return
    if overwrite:
        return
    if not resume:
        raise L2ZOError(f"{out} already exists; pick another --output, pass --resume to continue the probe there "
                        "(its measured pairs are kept) or --overwrite to start over")  # fmt: skip
    try:
        theirs = json.loads((out / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise L2ZOError(f"--resume: {out} holds no {CONFIG_FILE}, so it is not a probe this l2zo can resume; "
                        "pick another --output or pass --overwrite") from None  # fmt: skip
    diff = [k for k in MEASURE_KEYS if theirs.get(k) != cfg_dict[k]]
    if diff:
        shown = "; ".join(
            f"--{k.replace('_', '-').lower()}: {theirs.get(k)!r} there, {cfg_dict[k]!r} now" for k in diff
        )
        raise L2ZOError(f"--resume: {out} was measured with other settings ({shown}); give the same ones, or "
                        "--overwrite to measure again")  # fmt: skip


def _pairs_done(pairs: Path) -> int:
    return len(list(pairs.glob("state*-pair*.pt"))) if pairs.is_dir() else 0


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import shutil

    from l2zo.blockstats.probe import ProbeConfig, run_probe
    from l2zo.blockstats.report import allocations_table, write_outputs
    from l2zo.utils.io import write_json_atomic
    from l2zo.utils.rundir import LOCK_FILE, locked_run_folder
    from l2zo.utils.runstatus import RUNNING, record_end, signal_guard

    out = Path(args.output)
    keys = {f for f in ProbeConfig.__dataclass_fields__}
    cfg = ProbeConfig(**{k: v for k, v in vars(args).items() if k in keys})
    for artifact in cfg.artifacts:
        if not (Path(artifact) / "l2zo_artifact.json").is_file():
            raise L2ZOError(f"--artifact {artifact} is not a learned-optimizer folder (no l2zo_artifact.json)")
    cfg_dict = dataclasses.asdict(cfg)
    _check_folder(out, cfg_dict, args.overwrite, args.resume)
    with signal_guard() as guard, locked_run_folder(out, "--output") as folder:
        # --overwrite removes everything. --resume keeps the outputs of the run it continues until they are re-made
        # (write_outputs replaces each whole): a resume stopped again leaves the sigma files that compares read.
        if args.overwrite:
            for entry in [e for e in out.iterdir() if e.name != LOCK_FILE]:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        folder.started = True
        pairs = out / PAIRS_DIR
        total = cfg.pairs * len(cfg.states)
        status: dict[str, Any] = {"status": RUNNING, "pairs_total": total, "pairs_done": _pairs_done(pairs)}
        write_json_atomic(out / CONFIG_FILE, cfg_dict)
        write_json_atomic(out / STATUS_FILE, status)
        try:
            with guard.deferred():  # a signal stops the probe after the pair being measured is saved
                result = run_probe(cfg, pairs_dir=pairs, on_pair=guard.check)
            write_outputs(result, out)
        except BaseException as exc:
            record_end(status, exc)
            status["pairs_done"] = _pairs_done(pairs)
            if status["pairs_done"]:
                status["resume"] = "the same command with --resume continues from the saved pairs"
            write_json_atomic(out / STATUS_FILE, status)
            raise
        record_end(status, None)
        status.update(pairs_done=_pairs_done(pairs), wall_time_s=result["wall_time_s"])
        write_json_atomic(out / STATUS_FILE, status)
    print(allocations_table(result))
    print(f"\nwrote {out / 'probe.md'}, {out / 'probe.json'} and {len(result['sigma'])} sigma files in {out / 'sigma'}")
    return 0
