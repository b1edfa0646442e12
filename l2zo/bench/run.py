"""``run_bench``: time every row in one process on one batch, measure each row's memory in its own process,
and derive the ratios (``step_over_2fwd``, ``speedup_over_reference``, ``peak_over_inference``)."""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from typing import Any

import torch

from l2zo.bench.config import INFERENCE, REFERENCE, BenchConfig
from l2zo.bench.memory import measure_in_subprocess
from l2zo.bench.rows import Row, build_row, row_names
from l2zo.bench.workload import build_workload
from l2zo.tasks.scoring import SCORER_VERSION


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rows(rows: list[Row], device: torch.device, steps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call for each row. Rows are interleaved (round r calls every row once), so a slow spell of
    the machine hits every row alike instead of one row's whole series."""
    times: dict[str, list[float]] = {r.name: [] for r in rows}
    for r in range(warmup + steps):
        for row in rows:
            _sync(device)
            t0 = time.perf_counter()
            row.call()
            _sync(device)
            if r >= warmup:
                times[row.name].append(time.perf_counter() - t0)
    return times


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), cpu)
        flags = set(next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), []))
    except OSError:
        pass
    info = {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(), "device": str(device),
            # What decides the fast paths on a CPU: wide vectors for the passes, bf16 arithmetic for bf16-mixed.
            "avx512": "avx512f" in flags, "bf16_arithmetic": bool(flags & {"avx512_bf16", "amx_bf16"})}  # fmt: skip
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_bench(cfg: BenchConfig, log=print) -> dict[str, Any]:
    """Measure and return the full record (what ``--json`` writes)."""
    wl = build_workload(cfg)
    names = row_names(cfg)
    rows = [build_row(n, cfg, wl) for n in names]
    params = sum(p.numel() for p in {id(p): p for p in wl.loaded.model.parameters()}.values())
    log(f"bench: {cfg.model} ({params / 1e6:.1f}M parameters) on {wl.device}, {cfg.precision}, batch {cfg.batch_size} "
        f"x 2 candidates x {cfg.seq_len} tokens ({wl.task}), {cfg.steps} timed rounds, {torch.get_num_threads()} threads")  # fmt: skip
    times = time_rows(rows, wl.device, cfg.steps, cfg.warmup)
    fwd = statistics.median(times[INFERENCE])
    ref = statistics.median(times[REFERENCE]) if REFERENCE in times else None
    out_rows: dict[str, dict[str, Any]] = {}
    for row in rows:
        med = statistics.median(times[row.name])
        rec: dict[str, Any] = {"kind": row.kind, "median_s": med, "times_s": times[row.name], "note": row.note}
        if row.kind in ("zo", "reference"):
            rec["step_over_2fwd"] = med / (2 * fwd)
        if row.kind not in ("forward", "profile"):
            rec["step_over_fwd"] = med / fwd
        if ref is not None and row.kind in ("zo", "reference"):
            rec["speedup_over_reference"] = ref / med
        out_rows[row.name] = rec
    device = wl.device
    del rows, wl  # free the timing process's optimizer states before the memory processes start
    if cfg.memory:
        for name in [n for n in names if out_rows[n]["kind"] != "profile"]:
            log(f"bench: peak memory of {name} (fresh process)")
            out_rows[name].update(measure_in_subprocess(cfg, name))
        inf_peak = out_rows[INFERENCE]["peak_mb"]
        for name in names:
            if name != INFERENCE and "peak_mb" in out_rows[name]:
                out_rows[name]["peak_over_inference"] = out_rows[name]["peak_mb"] / inf_peak if inf_peak > 0 else None
    return {
        "config": dataclasses.asdict(cfg),
        "machine": machine_info(device),
        "model_params": params,
        "scorer": SCORER_VERSION,
        "rows": out_rows,
    }


def format_table(record: dict[str, Any]) -> str:
    """A markdown table of the record's rows."""
    head = "| row | median s | x 2 fwd | speed-up vs reference | peak MiB | x inference | note |"
    lines = [head, "|---|---|---|---|---|---|---|"]

    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for name, r in record["rows"].items():
        lines.append(f"| {name} | {r['median_s']:.3f} | {f(r.get('step_over_2fwd'), '.2f')} | "
                     f"{f(r.get('speedup_over_reference'), '.2f')} | {f(r.get('peak_mb'), '.0f')} | "
                     f"{f(r.get('peak_over_inference'), '.2f')} | {r.get('note', '')} |")  # fmt: skip
    return "\n".join(lines)
