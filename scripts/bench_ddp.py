"""Data-parallel throughput: `l2zo finetune` on 1 process and on N processes (`--strategy ddp`), same global batch.

    python scripts/bench_ddp.py --model llama-30m --devices 2 --steps 40

Each run is a real fine-tune (the tested code path); its summary.json gives ``time_per_step_s``, measured by the
module over the training steps. Examples per second = global batch / time per step. The CPU threads are split
evenly: the 1-process run gets all ``--threads``, each of the N processes gets threads / N, so both use the same
cores. Prints one markdown row for BENCHMARKS.md, with the CPU model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
        return names[0] if names else platform.processor()
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"


def run(a: argparse.Namespace, devices: int) -> float:
    """Seconds per step of one fine-tune on ``devices`` processes."""
    logdir = Path(a.out) / f"devices{devices}"
    cmd = [sys.executable, "-m", "l2zo", "finetune", "--model", a.model, "--task", a.task, "--optimizer", "mezo",
           "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--max-length", str(a.max_length),
           "--eval-every", str(a.steps), "--num-dev", "16", "--num-test", "16", "--device", "cpu",
           "--checkpoint-every", "0", "--logdir", str(logdir), "--overwrite", "--no-progress"]  # fmt: skip
    if devices > 1:
        cmd += ["--devices", str(devices), "--strategy", "ddp"]
    threads = str(max(1, a.threads // devices))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return float(json.loads((logdir / "summary.json").read_text())["time_per_step_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-30m")
    ap.add_argument("--task", default="synth-color")
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default="runs/bench-ddp")
    a = ap.parse_args()
    one, many = run(a, 1), run(a, a.devices)
    print("| CPU | model | batch x length | threads | 1 process: examples/s | "
          f"{a.devices} processes (ddp): examples/s | ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    print(f"| {cpu_name()} | {a.model} | {a.batch_size} x {a.max_length} | {a.threads} | "
          f"{a.batch_size / one:.1f} | {a.batch_size / many:.1f} | {one / many:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
