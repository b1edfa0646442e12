"""Held-out evaluation of a learned ZO optimizer: `l2zo compare` on every (model, task), then win counts.

    python scripts/evaluate_heldout.py --artifact checkpoints/smollm2-135m/zo-finetuner \\
        --models smollm2-135m,runs/derivatives/smollm2-135m-sst2lm --tasks rte,wsc,wic,cb \\
        --optimizers learned,mezo,learned-random,per-block-const --steps 100 --seeds 0,1 --jobs 2

Each (model, task) is one `l2zo compare` (the command is printed and recorded), run with ``--jobs`` of them
side by side, each on ``--threads`` CPU threads (two 1-thread processes use a 2-core CPU better than one
2-thread process: a ZO step has serial parts). A compare that already finished is not re-run, so the
script resumes after an interruption; asked for more ``--seeds`` than a finished compare has, it runs only the
missing seeds into the same folder (the compare's tables then cover all of them). It then reads every
compare's summary.csv and writes, under --docs (:func:`l2zo.compare.heldout.write_heldout`):

* summary.md / summary.csv: final dev loss and test accuracy (mean ± std over seeds) per model, task, optimizer;
* the win counts of `learned` over each other optimizer across (model, task) pairs: a win is a lower mean
  final dev loss;
* <model>/<task>/*.png: each compare's plots (dev loss against steps, test accuracy);
* commands.txt: the exact compare commands.

``learned`` and ``per-block-const`` take ``--artifact`` (per-block-const uses the artifact's recorded sigma per
block kind: the "is the net's dependence on the state worth anything" ablation); ``learned-random`` builds a
fresh net with the artifact's spec and normalisation.
"""

from __future__ import annotations

import argparse
import csv
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from l2zo.compare.heldout import compare_dir, model_label, write_heldout

ROOT = Path(__file__).resolve().parents[1]
ARTIFACT_OPTS = ("learned", "per-block-const", "learned-random")


def compare_args(a: argparse.Namespace, model: str, task: str) -> list[str]:
    items = []
    for opt in a.optimizers.split(","):
        name, _, extra = opt.partition(":")
        item = f"{name}={a.artifact}" if name in ARTIFACT_OPTS else name
        hp = [f"lr={a.lr}"] + ([extra] if extra else [])
        items.append(":".join([item, *hp]))
    return ["--model", model, "--task", task, "--data-dir", a.data_dir, "--optimizers", ",".join(items),
            "--steps", str(a.steps), "--seeds", a.seeds, "--batch-size", str(a.batch_size), "--eval-every",
            str(a.eval_every), "--num-dev", str(a.num_dev), "--num-test", str(a.num_test), "--max-length",
            str(a.max_length), "--precision", a.precision, "--cache-z",
            "--logdir", str(compare_dir(Path(a.out), model, task))]  # fmt: skip


def missing_seeds(logdir: Path, a: argparse.Namespace) -> list[str]:
    """The requested seeds that some optimizer of this compare has not finished (all of them on a first run)."""
    path = logdir / "summary.csv"
    if not path.is_file() or not all(r["status"] == "ok" for r in csv.DictReader(path.open())):
        return a.seeds.split(",")
    labels = [opt.partition(":")[0] for opt in a.optimizers.split(",")]
    return [k for k in a.seeds.split(",") if not all((logdir / lab / f"seed{k}" / "summary.json").is_file()
                                                     for lab in labels)]  # fmt: skip


def run_one(a: argparse.Namespace, model: str, task: str) -> tuple[str, float, int]:
    args = compare_args(a, model, task)
    logdir = Path(args[args.index("--logdir") + 1])
    seeds = missing_seeds(logdir, a)
    if not seeds:
        return f"{model_label(model)}/{task}: already done", 0.0, 0
    # More seeds for a finished compare run beside its seeds (the summary covers every seed in the folder);
    # anything else (a first run, a failed or interrupted one) starts the compare afresh.
    added = seeds != a.seeds.split(",")
    args[args.index("--seeds") + 1] = ",".join(seeds)
    env = {"OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    logdir.mkdir(parents=True, exist_ok=True)
    cmd = shlex.join(["l2zo", "compare", *args]) + "\n"
    with open(logdir / "command.txt", "a" if added else "w") as f:  # what aggregate lists
        f.write(cmd)
    t0 = time.time()
    with open(logdir.parent / f"{task}.log", "a" if added else "w") as log:
        rc = subprocess.run([sys.executable, "-m", "l2zo.cli.main", "compare", *args, *([] if added else ["--overwrite"])], cwd=ROOT,
                            env={**_base_env(), **env}, stdout=log, stderr=subprocess.STDOUT, check=False).returncode  # fmt: skip
    return f"{model_label(model)}/{task}: exit {rc}", time.time() - t0, rc


def _base_env() -> dict[str, str]:
    import os

    return dict(os.environ)


def aggregate(a: argparse.Namespace) -> None:
    title = f"Held-out evaluation: {a.steps} steps, lr {a.lr}, batch {a.batch_size}, {a.precision}"
    md = write_heldout(Path(a.out), ROOT / a.docs, a.models.split(","), a.tasks.split(","), title,
                       lambda m, t: shlex.join(["l2zo", "compare", *compare_args(a, m, t)]))  # fmt: skip
    print(md, end="")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--models", default="smollm2-135m")
    ap.add_argument("--tasks", default="rte,wsc,wic,cb")
    ap.add_argument("--optimizers", default="learned,mezo,learned-random,per-block-const")
    ap.add_argument("--lr", default="1e-5")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=50)
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
        work = [(m, t) for m in a.models.split(",") for t in a.tasks.split(",")]
        with ThreadPoolExecutor(max_workers=a.jobs) as pool:
            for msg, secs, _ in pool.map(lambda mt: run_one(a, *mt), work):
                print(f"{msg} ({secs:.0f} s)", flush=True)
    aggregate(a)


if __name__ == "__main__":
    main()
