"""Regenerate the shipped ``checkpoints/tiny`` and ``checkpoints/tiny-derived`` (about 3 minutes on 2 CPU cores).

    python scripts/build_tiny.py [--out checkpoints] [--eval-n 300]

Trains the tokenizer and the model from scratch (see ``l2zo.models.tiny``), then checks that the
model "knows something": the zero-shot accuracy of each ``synth-*`` task (argmax of the mean
candidate log-likelihood on the test split) is written into each folder's ``build_info.json``, next
to the same number for an untrained model with the same tokenizer (the chance baseline).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from l2zo.models.tiny import FULL, build_tiny, tiny_config, zero_shot_accuracy
from l2zo.tasks.base import SplitSizes
from l2zo.tasks.synthetic import SYNTH_HELD_OUT, SYNTH_META_TRAIN, synth_tasks

ROOT = Path(__file__).resolve().parents[1]


def evaluate(folder: Path, n: int) -> dict[str, float]:
    """Zero-shot test accuracy per synth task for the checkpoint in ``folder``."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    sizes = SplitSizes(train=0, dev=0, test=n)
    tasks = synth_tasks().values()
    return {t.name: round(zero_shot_accuracy(model, tok, t.load(None, sizes, seed=0).test), 3) for t in tasks}


def untrained_baseline(folder: Path, n: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config(transformers.AutoTokenizer.from_pretrained(folder).vocab_size))
    tmp = Path(tempfile.mkdtemp())
    model.save_pretrained(tmp)
    transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(tmp)
    try:
        return evaluate(tmp, n)
    finally:
        shutil.rmtree(tmp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "checkpoints")
    ap.add_argument("--eval-n", type=int, default=300, help="test examples per task for the zero-shot check")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(2)  # the reference machine; also fixes the reduction order for determinism

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        infos = build_tiny(Path(tmp), FULL, command="python scripts/build_tiny.py " + " ".join(sys.argv[1:]))
        baseline = untrained_baseline(Path(tmp) / "tiny", args.eval_n)
        for name, info in infos.items():
            folder = Path(tmp) / name
            info["zero_shot_test_accuracy"] = evaluate(folder, args.eval_n)
            info["zero_shot_untrained_baseline"] = baseline
            info["zero_shot_eval"] = f"{args.eval_n} test examples per task, data seed 0, mean candidate log-lik argmax"
            info["meta_train_tasks"], info["held_out_tasks"] = list(SYNTH_META_TRAIN), list(SYNTH_HELD_OUT)
            (folder / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
            dest = args.out / name
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(folder, dest)
            print(f"{name}: {info['parameters']} params, loss {info['phases'][-1]['final_lm_loss']}, "
                  f"zero-shot {info['zero_shot_test_accuracy']}")  # fmt: skip
    print(f"untrained baseline: {baseline}\ntotal {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
