"""Held-out evaluation of a learned ZO optimizer: `l2zo compare` on every (model, task), then win counts.

    python scripts/evaluate_heldout.py --artifact checkpoints/smollm2-135m/zo-finetuner \\
        --models smollm2-135m,runs/derivatives/smollm2-135m-sst2lm --tasks rte,cb,multirc \\
        --optimizers learned,mezo,learned-random,per-block-const --steps 100 --seeds 0,1,2 --jobs 2 \
        --lr-grid 1e-6,1e-5,1e-4 --tune-steps 50 --baseline mezo

Each (model, task) is one `l2zo compare` (the command is printed and recorded), run with ``--jobs`` of them
side by side, each on ``--threads`` CPU threads (two 1-thread processes use a 2-core CPU better than one
2-thread process: a ZO step has serial parts). With ``--lr-grid`` every optimizer's lr is tuned on dev (one
seed, ``--tune-steps``; ``--lr-tolerance`` prefers a smaller lr of near-equal score), else all run at ``--lr``.
A folder that already holds the compare is resumed (``l2zo compare --resume``): finished runs are kept, and
more ``--seeds`` or more ``--optimizers`` (an item may name its artifact and label: ``learned=DIR:label=learned-es``)
only add runs. It then reads every
compare's summary.csv and writes, under --docs (:func:`l2zo.compare.heldout.write_heldout`):

* summary.md / summary.csv: final dev loss and test accuracy (mean ± std over seeds) per model, task, optimizer;
* the win counts of each of ``--champions`` over each other optimizer across (model, task) pairs: by the
  lower mean final dev loss, and by the paired 95% CI over seeds (paired.csv);
* <model>/<task>/*.png, tuning.csv: each compare's plots (dev loss against steps, test accuracy) and lr tuning;
* commands.txt: the exact compare commands.

``learned`` and ``per-block-const`` take ``--artifact`` (per-block-const uses the artifact's recorded sigma per
block kind: the "is the net's dependence on the state worth anything" ablation); ``learned-random`` builds a
fresh net with the artifact's spec and normalisation.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from l2zo.compare.heldout import compare_dir, model_label, write_heldout
from l2zo.compare.run import EXPERIMENT_FILE

ROOT = Path(__file__).resolve().parents[1]
ARTIFACT_OPTS = ("learned", "per-block-const", "learned-random")


def optimizer_items(a: argparse.Namespace, task: str) -> list[str]:
    """The compare's --optimizers items: a bare learned/per-block-const/learned-random takes --artifact; an item
    may carry its own artifact and label (``learned=DIR:label=learned-es``); with no --lr-grid every item runs
    at --lr. ``{task}`` in an item becomes the task (a per-task file: ``fixed-sigma:sigma_file=DIR/{task}.json``)."""
    items = []
    for opt in a.optimizers.replace("{task}", task).split(","):
        name, _, extra = opt.partition(":")
        item = f"{name}={a.artifact}" if name in ARTIFACT_OPTS else name
        hp = ([] if a.lr_grid else [f"lr={a.lr}"]) + ([extra] if extra else [])
        items.append(":".join([item, *hp]))
    return items


def compare_args(a: argparse.Namespace, model: str, task: str) -> list[str]:
    tuning = ["--lr-grid", a.lr_grid, "--tune-steps", str(a.tune_steps or a.steps)] if a.lr_grid else []
    if a.lr_grid and a.tune_seeds is not None:  # seeds outside --seeds: no evaluated run is also a tuning run
        tuning += ["--tune-seeds", a.tune_seeds]
    if a.lr_grid and a.lr_tolerance:
        tuning += ["--lr-tolerance", f"{a.lr_tolerance:g}"]
    return ["--model", model, "--task", task, "--data-dir", a.data_dir, "--optimizers", ",".join(optimizer_items(a, task)),
            "--steps", str(a.steps), "--seeds", a.seeds, "--batch-size", str(a.batch_size), "--eval-every",
            str(a.eval_every), "--num-train", str(a.num_train), "--num-dev", str(a.num_dev), "--num-test",
            str(a.num_test), "--max-length", str(a.max_length), "--precision", a.precision, "--cache-z", *tuning,
            *(["--baseline", a.baseline] if a.baseline else []),
            "--logdir", str(compare_dir(Path(a.out), model, task))]  # fmt: skip


def run_one(a: argparse.Namespace, model: str, task: str) -> tuple[str, float, int]:
    """One compare; a folder that already holds this experiment is resumed (finished runs are kept, new seeds
    and new optimizers are added), so the script picks up after an interruption."""
    args = compare_args(a, model, task)
    logdir = Path(args[args.index("--logdir") + 1])
    resume = (logdir / EXPERIMENT_FILE).is_file()
    env = {"OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    logdir.mkdir(parents=True, exist_ok=True)
    with open(logdir / "command.txt", "w") as f:  # what aggregate lists
        f.write(shlex.join(["l2zo", "compare", *args]) + "\n")
    t0 = time.time()
    with open(logdir.parent / f"{task}.log", "a" if resume else "w") as log:
        rc = subprocess.run([sys.executable, "-m", "l2zo.cli.main", "compare", *args, *(["--resume"] if resume else [])],
                            cwd=ROOT, env={**_base_env(), **env}, stdout=log, stderr=subprocess.STDOUT,
                            check=False).returncode  # fmt: skip
    return f"{model_label(model)}/{task}: exit {rc}", time.time() - t0, rc


def _base_env() -> dict[str, str]:
    import os

    return dict(os.environ)


def aggregate(a: argparse.Namespace) -> None:
    lr = (
        f"lr tuned on dev from {a.lr_grid} ({a.tune_steps or a.steps} steps, seed "
        f"{a.seeds.split(',')[0] if a.tune_seeds is None else a.tune_seeds}"
        f"{f'; the smallest lr within {a.lr_tolerance:.0%} of the best decrease' if a.lr_tolerance else ''})"
        if a.lr_grid
        else f"lr {a.lr}"
    )
    title = f"Held-out evaluation: {a.steps} steps, {lr}, batch {a.batch_size}, {a.precision}"
    md = write_heldout(Path(a.out), ROOT / a.docs, a.models.split(","), a.tasks.split(","), title,
                       lambda m, t: shlex.join(["l2zo", "compare", *compare_args(a, m, t)]),
                       champions=a.champions.split(","))  # fmt: skip
    print(md, end="")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--models", default="smollm2-135m")
    ap.add_argument("--tasks", default="rte,cb,multirc")  # WiC and WSC stay at chance on SmolLM2 (EVALUATION §0c)
    ap.add_argument("--optimizers", default="learned,mezo,learned-random,per-block-const")
    ap.add_argument("--lr", default="1e-5", help="every optimizer's lr when no --lr-grid is given")
    ap.add_argument(
        "--lr-grid", default=None, help="tune each optimizer's lr on dev from this grid (compare --lr-grid)"
    )
    ap.add_argument("--tune-steps", type=int, default=None, help="steps of each lr-tuning run (default: --steps)")
    ap.add_argument(
        "--lr-tolerance",
        type=float,
        default=0.0,
        help="pick the smallest lr within this fraction of the best dev-loss decrease (compare --lr-tolerance)",
    )
    ap.add_argument(
        "--tune-seeds", default=None, help="seeds of the lr-tuning runs, e.g. 100,101 (default: first of --seeds)"
    )
    ap.add_argument("--baseline", default=None, help="the reference of each compare's paired table")
    ap.add_argument("--champions", default="learned", help="run labels whose paired wins are counted")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--num-train", type=int, default=1000)
    ap.add_argument("--num-dev", type=int, default=64)
    ap.add_argument("--num-test", type=int, default=200)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--precision", default="32", help="32, or bf16-mixed on a CPU or GPU with bf16 arithmetic")
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--out", default="runs/heldout")
    ap.add_argument("--docs", default="docs/results/heldout")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--aggregate-only", action="store_true")
    a = ap.parse_args()
    if not a.aggregate_only:
        # Task by task: the tasks listed first finish on every model first.
        work = [(m, t) for t in a.tasks.split(",") for m in a.models.split(",")]
        with ThreadPoolExecutor(max_workers=a.jobs) as pool:
            for msg, secs, _ in pool.map(lambda mt: run_one(a, *mt), work):
                print(f"{msg} ({secs:.0f} s)", flush=True)
    aggregate(a)


if __name__ == "__main__":
    main()
