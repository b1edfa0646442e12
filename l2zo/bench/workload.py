"""The benchmark's workload: the model, one real batch at an exact shape, and the rows to time.

The batch is ``batch_size`` examples of a task, two candidates each, every sequence exactly ``seq_len``
tokens: each prompt is preceded by other training examples written as demonstrations (MeZO's ICL format,
joined by blank lines) until it is longer than ``seq_len``, and the scorer keeps its last ``seq_len`` tokens.
So the forward is the one a ZO step runs in fine-tuning (candidate scoring, LM head at the candidates only),
at the shape the flags name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from l2zo.bench.config import BenchConfig
from l2zo.errors import L2ZOError
from l2zo.learned.artifact import MANIFEST_FILE
from l2zo.models import LoadedModel, load_model
from l2zo.models.tiny import SHIPPED_ROOT
from l2zo.tasks import CandidateScorer, Example, SplitSizes, get_task
from l2zo.tasks.scoring import ScoringBatch


@dataclass
class Workload:
    loaded: LoadedModel
    device: torch.device
    batch: ScoringBatch
    loss_kind: str
    scorer: CandidateScorer
    task: str
    precision: str = "32"

    def loss(self) -> torch.Tensor:
        """The training loss on the batch: one forward pass (fp32 scalar)."""
        return self.scorer.loss(self.loaded.model, self.batch, self.loss_kind)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16-mixed":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise L2ZOError("--device cuda but no CUDA device is visible; use --device cpu or auto")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def _demonstrations(pool: list[Example]) -> Iterator[str]:
    while True:
        for ex in pool:
            yield ex.prompt + ex.candidates[ex.label]


def lengthen(examples: list[Example], pool: list[Example], scorer: CandidateScorer, seq_len: int) -> list[Example]:
    """Prefix each prompt with demonstrations from ``pool`` until prompt + candidate exceeds ``seq_len`` tokens."""
    demos = _demonstrations(pool)
    out = []
    for ex in examples:
        prompt = ex.prompt
        while len(scorer.tokenizer(prompt, add_special_tokens=False)["input_ids"]) < seq_len:
            prompt = next(demos) + "\n\n" + prompt
        out.append(Example(prompt, ex.candidates, ex.label))
    return out


def build_workload(cfg: BenchConfig) -> Workload:
    """Load the model onto the device and build the one batch every row is timed on."""
    device = resolve_device(cfg.device)
    loaded = load_model(cfg.model, attn_implementation=cfg.attn_implementation)
    loaded.model.to(device)
    task_name = cfg.task or ("sst2" if cfg.data_dir else "synth-sentiment")
    task = get_task(task_name)
    n_pool = max(4 * cfg.batch_size, 64)
    root = Path(cfg.data_dir) if cfg.data_dir else None
    data = task.load(root, SplitSizes(train=n_pool, dev=1, test=1), seed=0)
    if len(data.train) < cfg.batch_size + 1:
        raise L2ZOError(
            f"task {task_name} has {len(data.train)} training examples; --batch-size {cfg.batch_size} needs more"
        )
    scorer = CandidateScorer(loaded.tokenizer, max_length=cfg.seq_len)
    examples = data.train[: cfg.batch_size]
    examples = lengthen(examples, data.train[cfg.batch_size :], scorer, cfg.seq_len)
    batch = scorer.collate(examples).to(device)
    return Workload(loaded, device, batch, task.loss_kind, scorer, task_name, cfg.precision)


def default_artifact(model: str) -> Path | None:
    """checkpoints/<model>/zo-finetuner if it exists (the shipped artifact for an alias)."""
    path = SHIPPED_ROOT / model / "zo-finetuner"
    return path if (path / MANIFEST_FILE).is_file() else None
