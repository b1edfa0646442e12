"""``BenchConfig``: what ``l2zo bench`` measures (every field is a flag)."""

from __future__ import annotations

import dataclasses

from l2zo.config import PRECISIONS, check_choice
from l2zo.errors import L2ZOError

REFERENCE = "mezo-reference"  # the row of MeZO's published loop (l2zo.bench.reference)
INFERENCE = "inference"  # the row of one forward pass


@dataclasses.dataclass
class BenchConfig:
    model: str = "tiny"
    batch_size: int = 16
    seq_len: int = 64
    precision: str = "32"
    steps: int = 10
    warmup: int = 2
    optimizers: list[str] = dataclasses.field(default_factory=lambda: ["mezo", "learned", "zo-adam", "fo-adam"])
    artifact: str | None = None
    task: str | None = None
    data_dir: str | None = None
    reference: bool = True
    cache_z: bool = False
    profile: bool = True
    memory: bool = True
    memory_steps: int = 2
    device: str = "auto"
    attn_implementation: str | None = None
    json: str | None = None

    def __post_init__(self) -> None:
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        for key in ("batch_size", "seq_len", "steps", "memory_steps"):
            if getattr(self, key) <= 0:
                raise L2ZOError(f"--{key.replace('_', '-')} must be positive, got {getattr(self, key)}")
        if self.warmup < 0:
            raise L2ZOError(f"--warmup must be >= 0, got {self.warmup}")
        if self.seq_len < 8:
            raise L2ZOError(f"--seq-len {self.seq_len} is too short for a prompt and a candidate; use >= 8")
        if not self.optimizers:
            raise L2ZOError("--optimizers must name at least one optimizer")
        from l2zo.optim import optimizer_specs

        known = optimizer_specs()
        for name in self.optimizers:
            if name not in known:
                raise L2ZOError(f"unknown optimizer {name!r} in --optimizers; valid: {', '.join(sorted(known))}")


BENCH_FIELD_HELP: dict[str, str] = {
    "model": "model alias, folder, .gguf or hub id (tiny, llama-10m, llama-30m, smollm2-135m, ...)",
    "batch_size": "examples per batch (each has 2 candidates, so 2x sequences)",
    "seq_len": "tokens per sequence: every prompt is lengthened with other training prompts to exactly this",
    "precision": "32 or bf16-mixed (bf16 autocast over fp32 weights, losses in fp32)",
    "steps": "timed repetitions per row (median reported); rows are interleaved, one call each per round",
    "warmup": "untimed calls per row first",
    "optimizers": "comma-separated optimizers to time (learned falls back to learned-random without an artifact)",
    "artifact": "artifact folder for `learned` (default: checkpoints/<model>/zo-finetuner when it exists)",
    "task": "task whose prompts fill the batch (default: sst2 with --data-dir, else synth-sentiment)",
    "data_dir": "local data root for GLUE-style tasks",
    "reference": "also time MeZO's published loop (four regenerations, out of place, global RNG)",
    "cache_z": "also time mezo with the cached-z mode (one generation per step, one parameter-sized copy)",
    "profile": "also time one regeneration pass of z over all blocks (threaded and 1 thread): where a step's overhead goes",
    "memory": "measure peak memory per row, each in a fresh subprocess",
    "memory_steps": "calls per memory subprocess",
    "device": "auto, cpu or cuda",
    "attn_implementation": "attention kernel (default: the model's)",
    "json": "write every figure to this JSON file (atomically)",
}
