"""Peak memory of one bench row, measured in a fresh process: ``python -m l2zo.bench.memory CONFIG_JSON ROW``.

A fresh process per row, because a process's peak RSS only grows: measuring rows one after the other in one
process would charge each row with the peaks of the rows before it. The baseline is taken once the model,
the batch and the row (its optimizer) are built and one inference forward has run (a warm model); on CPU the
peak is the OS's high-water mark of the resident set (VmHWM, reset through /proc/self/clear_refs so the model's loading peak does not count; glibc's mmap threshold
fixed so freed buffers leave the resident set, see ``measure_in_subprocess``), on CUDA
``torch.cuda.max_memory_allocated``. Both are reported minus the baseline: the memory the work itself needs.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from l2zo.bench.config import BenchConfig
from l2zo.errors import L2ZOError

_MARK = "L2ZO_BENCH_MEMORY "


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"{key} not in /proc/self/status")


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def measure_row(cfg: BenchConfig, name: str) -> dict[str, float | str]:
    """Build the workload and row ``name``, then run ``cfg.memory_steps`` calls; peak above the baseline in MiB."""
    from l2zo.bench.rows import build_row
    from l2zo.bench.workload import build_workload

    wl = build_workload(cfg)
    row = build_row(name, cfg, wl)
    # A model ready to serve has run once: one inference forward before the baseline, for every row alike, so the
    # first touch of the library code a forward runs (file-backed pages, counted in the RSS) and the allocator's
    # one-off set-up are not charged to whichever row happens to run first. It creates no state of any row:
    # an optimizer's buffers (moments, caches, worker threads) are allocated by its first call, after the baseline.
    with torch.inference_mode(), wl.autocast():
        wl.loss()
    gc.collect()
    if wl.device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(wl.device) / 2**20
        torch.cuda.reset_peak_memory_stats(wl.device)
        for _ in range(cfg.memory_steps):
            row.call()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(wl.device) / 2**20
        return {"baseline_mb": base, "peak_mb": peak - base, "method": "torch.cuda.max_memory_allocated"}
    if not _reset_cpu_peak():
        raise L2ZOError("peak memory on CPU needs /proc/self/clear_refs (Linux); pass --no-memory elsewhere")
    base = _status_mb("VmRSS")
    for _ in range(cfg.memory_steps):
        row.call()
    peak = _status_mb("VmHWM")
    return {"baseline_mb": base, "peak_mb": peak - base, "method": "VmHWM - VmRSS after load (fresh process)"}


def measure_in_subprocess(cfg: BenchConfig, name: str) -> dict[str, float | str]:
    """Run :func:`measure_row` in a fresh interpreter and return its result."""
    payload = json.dumps(dataclasses.asdict(cfg))
    # glibc's malloc raises its mmap threshold after the first large free and then keeps freed activations in
    # the heap, so the resident set drifts with the history of allocations (tens of MiB between identical
    # forwards). A fixed threshold serves every buffer >= 256 KiB with its own mapping, returned on free: the
    # peak RSS then tracks the peak of live memory. Only this measuring process runs so (never timed).
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "MALLOC_MMAP_THRESHOLD_": str(256 * 1024),
           "MALLOC_TRIM_THRESHOLD_": str(1024 * 1024)}  # fmt: skip
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "l2zo.bench.memory", payload, name], capture_output=True, text=True,
                          env=env, check=False)  # fmt: skip
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK) :])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
    raise L2ZOError(f"the memory measurement of {name!r} failed (exit {proc.returncode}):\n{tail}")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    cfg = BenchConfig(**json.loads(args[0]))
    print(_MARK + json.dumps(measure_row(cfg, args[1])), flush=True)


if __name__ == "__main__":
    main()
