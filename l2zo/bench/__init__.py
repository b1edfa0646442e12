"""``l2zo bench``: the cost of a ZO step against the physical floor of two forward passes, and its memory
against inference. See BENCHMARKS.md for the measured tables and scripts/bench_all.py to regenerate them."""

from l2zo.bench.config import BenchConfig
from l2zo.bench.reference import mezo_reference_step
from l2zo.bench.run import run_bench

__all__ = ["BenchConfig", "mezo_reference_step", "run_bench"]
