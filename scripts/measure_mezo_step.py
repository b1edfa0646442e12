"""Time one MeZO step and its peak memory on a real batch (the figures quoted in the README).

    python scripts/measure_mezo_step.py --model smollm2-135m --precision bf16-mixed [--steps 5]

One process per configuration: peak memory is the process's peak RSS after the step minus the RSS
right after loading the model (on CUDA: torch.cuda.max_memory_allocated). The batch is 16 SST-2
examples from ../shared/data (2 candidates each, so 32 sequences), truncated to --max-length tokens.
Speed is judged here, never in a timed test. `l2zo bench` (planned) will supersede this script.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch

from l2zo.models import load_model
from l2zo.optim import MeZO
from l2zo.tasks import CandidateScorer, SplitSizes, get_task
from l2zo.utils.memory import peak_memory_mb

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--precision", default="32", choices=("32", "bf16-mixed"))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    args = ap.parse_args()

    loaded = load_model(args.model)
    model = loaded.model
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    data = get_task("sst2").load(Path(args.data_dir), SplitSizes(train=args.batch_size, dev=1, test=1), seed=0)
    scorer = CandidateScorer(loaded.tokenizer, max_length=args.max_length)
    batch = scorer.collate(data.train[: args.batch_size]).to(device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16-mixed" else contextlib.nullcontext()
    )
    opt = MeZO(model, lr=1e-7, eps=1e-3)
    # Forget the loading peak (GGUF dequantisation): "5" resets the VmHWM that ru_maxrss reports.
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss_mb()
    times = []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        with autocast:
            opt.step(lambda: scorer.loss(model, batch, "classification"))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out = {
        "model": args.model,
        "params": sum(p.numel() for p in model.parameters()),
        "precision": args.precision,
        "batch": f"{args.batch_size} examples x 2 candidates, <= {args.max_length} tokens",
        "threads": torch.get_num_threads(),
        "step_s_median": statistics.median(times[1:]),
        "step_s_all": [round(t, 3) for t in times],
        "rss_after_load_mb": round(base),
        "peak_mb": round(peak_memory_mb(device)),
        "peak_over_load_mb": round(peak_memory_mb(device) - base) if device.type == "cpu" else None,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
