"""``BenchConfig``: what ``l2zo bench`` measures (every field is a flag)."""

from __future__ import annotations

import dataclasses

from l2zo.config import Device, Precision, ZArgs, check_fields, split_list
from l2zo.errors import L2ZOError

REFERENCE = "mezo-reference"  # the row of MeZO's published loop (l2zo.bench.reference)
INFERENCE = "inference"  # the row of one forward pass

# Row-name suffixes: how the row's optimizer draws and applies z (ZArgs).
VARIANTS = {"cache-z": {"cache_z": True}, "table": {"z_source": "table"}, "two-pass": {"two_pass": True}}
NOTES = {"cache-z": "z drawn once per step into one parameter-sized copy",
         "table": "z from a 2 MiB noise table (--z-source table)",
         "two-pass": "two passes over the weights a step (--two-pass)"}  # fmt: skip


def split_row(name: str) -> tuple[str, ZArgs]:
    """'mezo+table+two-pass' -> ('mezo', ZArgs(z_source='table', two_pass=True)); a plain name gets ZArgs()."""
    opt_name, *variants = name.split("+")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise L2ZOError(f"unknown bench row variant {'+'.join(unknown)!r} in {name!r}; use {', '.join(VARIANTS)}")
    return opt_name, ZArgs(**{k: v for var in variants for k, v in VARIANTS[var].items()})


@dataclasses.dataclass
class BenchConfig:
    """Benchmark"""

    model: str = "tiny"
    """model alias, folder, .gguf or hub id (tiny, llama-10m, llama-30m, smollm2-135m, ...)"""
    batch_size: int = 16
    """examples per batch (each has 2 candidates, so 2x sequences)"""
    seq_len: int = 64
    """tokens per sequence: every prompt is lengthened with other training prompts to exactly this"""
    precision: Precision = "32"
    """32 or bf16-mixed (bf16 autocast over fp32 weights, losses in fp32)"""
    steps: int = 10
    """timed repetitions per row (median reported); rows are interleaved, one call each per round"""
    warmup: int = 2
    """untimed calls per row first"""
    optimizers: list[str] | str = dataclasses.field(default_factory=lambda: ["mezo", "learned", "zo-adam", "fo-adam"])
    """comma-separated optimizers to time (learned falls back to learned-random without an artifact)"""
    artifact: str | None = None
    """artifact folder for `learned` (default: checkpoints/<model>/zo-finetuner when it exists)"""
    task: str | None = None
    """task whose prompts fill the batch (default: sst2 with --data-dir, else synth-sentiment)"""
    data_dir: str | None = None
    """local data root for GLUE-style tasks"""
    reference: bool = True
    """also time MeZO's published loop (four regenerations, out of place, global RNG)"""
    cache_z: bool = False
    """also time mezo with the cached-z mode (one generation per step, one parameter-sized copy)"""
    z_paths: bool = True
    """also time the memory-speed paths: mezo and learned with z from a noise table (mezo+table, learned+table), mezo
    with the table and two passes a step (mezo+table+two-pass), and one pass over the table (z-pass-table). Any
    optimizer row may name them itself: NAME+table, NAME+two-pass, NAME+cache-z"""
    profile: bool = True
    """also time one regeneration pass of z over all blocks (threaded and 1 thread): where a step's overhead goes"""
    memory: bool = True
    """measure peak memory per row, each in a fresh subprocess"""
    memory_steps: int = 2
    """calls per memory subprocess"""
    device: Device = "auto"
    """auto, cpu or cuda"""
    attn_implementation: str | None = None
    """attention kernel (default: the model's)"""
    json: str | None = None
    """write every figure to this JSON file (atomically)"""

    def __post_init__(self) -> None:
        self.optimizers = split_list(self.optimizers)
        check_fields(self, positive=("batch_size", "seq_len", "steps", "memory_steps"))
        if self.warmup < 0:
            raise L2ZOError(f"--warmup must be >= 0, got {self.warmup}")
        if self.seq_len < 8:
            raise L2ZOError(f"--seq-len {self.seq_len} is too short for a prompt and a candidate; use >= 8")
        if not self.optimizers:
            raise L2ZOError("--optimizers must name at least one optimizer")
        from l2zo.optim import optimizer_specs

        known = optimizer_specs()
        for name in self.optimizers:
            if split_row(name)[0] not in known:
                raise L2ZOError(f"unknown optimizer {name!r} in --optimizers; valid: {', '.join(sorted(known))}")
