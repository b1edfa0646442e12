"""Artifacts: round trip, refusal of other architectures and tampered files, derivatives, partial loads,
format versions, atomic writes, ``l2zo inspect`` and the "learned" optimizer built from a folder."""

from __future__ import annotations

import json
import logging
import math
import pickle
from pathlib import Path

import pytest
import torch

import l2zo
from l2zo.cli.main import main as cli_main
from l2zo.engine import partition
from l2zo.errors import L2ZOError
from l2zo.learned import (
    ArtifactWarning,
    FeatureSpec,
    NetSpec,
    VarianceNet,
    build_features,
    load_artifact,
    save_artifact,
    weight_stats,
)
from l2zo.learned import artifact as artifact_mod
from l2zo.optim import build_optimizer
from l2zo.optim.methods.learned import LearnedZO
from tests.helpers import lm_loss, tiny_llama


def _save(path: Path, model: torch.nn.Module, spec: NetSpec | None = None, name: str = "tiny-a", **kw) -> VarianceNet:
    spec = spec or NetSpec()
    blocks = partition(model)
    net = VarianceNet(spec, [b.name for b in blocks], seed=11)
    save_artifact(
        path, net, blocks,
        base_model={"name": name, "revision": "r1"},
        meta_config={"meta": {"steps": 3}, "tasks": ["synth"]},
        meta_record={"tasks": ["synth"], "steps": 3, "seed": 0, "objective": "lookahead", "final_meta_loss": 1.5},
        normalization={"rule": "paper", "batch_size": 8}, model=model, **kw,
    )  # fmt: skip
    return net


def _features(blocks) -> torch.Tensor:
    sigma_prev = torch.rand(len(blocks), generator=torch.Generator().manual_seed(2))
    return build_features(weight_stats(blocks), 3.0, 2.5, sigma_prev, FeatureSpec())


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[Path, VarianceNet]:
    path = tmp_path / "art"
    return path, _save(path, tiny_llama())


def test_round_trip_gives_identical_sigma_and_a_complete_manifest(saved):
    path, net = saved
    files = sorted(p.name for p in path.iterdir())
    assert files == ["l2zo_artifact.json", "meta_config.yaml", "variance_net.safetensors"]
    blocks = partition(tiny_llama())
    loaded = load_artifact(path, blocks)
    feats = _features(blocks)
    assert torch.equal(loaded.net(feats), net(feats))
    assert loaded.unmatched == [] and loaded.sigma_fallback == [False] * len(blocks)
    m = loaded.manifest
    for key in ("format_version", "l2zo_version", "kind", "base_model", "net", "normalization", "meta_training",
                "sigma_by_kind", "weight_stats", "weights_sha256", "created"):  # fmt: skip
        assert key in m, key
    assert m["l2zo_version"].startswith(l2zo.__version__)
    assert m["base_model"]["num_blocks"] == len(blocks) and len(m["base_model"]["blocks"]) == len(blocks)
    assert len(m["normalization"]["block_weights"]) == len(blocks) and m["normalization"]["rule"] == "paper"
    assert "q_proj" in m["sigma_by_kind"] and m["net"]["feature_names"][0] == "weight_mean"


def test_loading_never_unpickles(saved, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("unpickling during artifact load")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    load_artifact(saved[0], partition(tiny_llama()))


def test_other_architecture_is_refused_naming_the_block(saved):
    with pytest.raises(L2ZOError) as info:
        load_artifact(saved[0], partition(tiny_llama(hidden=32)))
    msg = str(info.value)
    assert "model.embed_tokens.weight" in msg and "[97, 16]" in msg and "[97, 32]" in msg
    assert "partial=True" in msg and "--opt-args partial=true" in msg


def test_tampered_weights_are_refused(saved):
    weights = saved[0] / "variance_net.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(L2ZOError, match="sha256"):
        load_artifact(saved[0], partition(tiny_llama()))


def test_derivative_with_same_architecture_warns_and_loads(saved):
    derived = tiny_llama(seed=5)  # same architecture, other weights
    derived.config._name_or_path = "someone/tiny-a-instruct"
    with pytest.warns(ArtifactWarning, match="tiny-a"):
        opt = build_optimizer("learned", derived, artifact=str(saved[0]), lr=1e-3)
    assert isinstance(opt, LearnedZO) and opt.normalization == "paper"
    assert torch.isfinite(opt.step(lambda: lm_loss(derived, torch.randint(0, 97, (2, 8)))))


def test_partial_load_reports_unmatched_blocks_and_gives_them_sigma_one(saved, caplog):
    deeper = tiny_llama(layers=3)
    blocks = partition(deeper)
    with pytest.raises(L2ZOError, match="block 19"):
        load_artifact(saved[0], blocks)
    with caplog.at_level(logging.WARNING, logger="l2zo"):
        loaded = load_artifact(saved[0], blocks, partial=True)
    expected = [b.name for b in blocks if ".layers.2." in b.name]
    assert loaded.unmatched == expected and len(expected) == 9
    assert "9 of 29 blocks unmatched" in caplog.text and expected[0] in caplog.text
    # Matched rows are the source net's rows: the same output on the same feature row.
    src_net, feats = saved[1], torch.randn(len(blocks), 5)
    src_index = {n: i for i, n in enumerate(src_net.block_names)}
    src_feats = torch.zeros(src_net.num_blocks, 5)
    for j, b in enumerate(blocks):
        if b.name in src_index:
            src_feats[src_index[b.name]] = feats[j]
    out, ref = loaded.net(feats), src_net(src_feats)
    for j, b in enumerate(blocks):
        if b.name in src_index:
            assert torch.equal(out[j], ref[src_index[b.name]])
    opt = build_optimizer("learned", deeper, artifact=str(saved[0]), partial=True, lr=1e-3)
    raw = opt.raw_sigma()
    assert all(float(raw[j]) == 1.0 for j, fb in enumerate(loaded.sigma_fallback) if fb)
    assert torch.isfinite(opt.step(lambda: lm_loss(deeper, torch.randint(0, 97, (2, 8)))))


def test_unknown_format_version_is_refused(saved):
    file = saved[0] / "l2zo_artifact.json"
    manifest = json.loads(file.read_text())
    manifest["format_version"] = 99
    file.write_text(json.dumps(manifest))
    with pytest.raises(L2ZOError, match="format_version 99"):
        load_artifact(saved[0], partition(tiny_llama()))


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    def half_then_fail(tensors, path):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(artifact_mod, "_write_weights", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path / "art", tiny_llama())
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_artifact(saved, monkeypatch):
    path, net = saved
    monkeypatch.setattr(artifact_mod, "_write_weights", lambda t, p: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        _save(path, tiny_llama(), overwrite=True)
    assert sorted(p.name for p in path.parent.iterdir()) == ["art"]
    blocks = partition(tiny_llama())
    assert torch.equal(load_artifact(path, blocks).net(_features(blocks)), net(_features(blocks)))


def test_inspect_prints_the_summary_and_sigma_per_kind(saved, capsys):
    assert cli_main(["inspect", str(saved[0])]) == 0
    out = capsys.readouterr().out
    assert "tiny-a" in out and "paper (batch_size 8)" in out and "final_meta_loss" in out
    assert "L=0.7" in out and "L=2" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("q_proj", "embed_tokens", "down_proj"))]
    assert len(rows) == 3 and all(len(r) == 6 for r in rows)


def test_inspect_shows_a_kind_scale_nets_table(tmp_path, capsys):
    model, path = tiny_llama(), tmp_path / "kind"
    net = _save(path, model, NetSpec(hidden=4, kind_scale=True))
    with torch.no_grad():  # the table: the embedding at 1/4, every other kind at 1
        net.kind_log_scale[net.kinds.index("embed_tokens")] = math.log(0.25)
    blocks = partition(model)
    save_artifact(path, net, blocks, base_model={"name": "tiny-a", "revision": "r1"}, meta_config={}, meta_record={},
                  normalization={"rule": "numel"}, model=model, overwrite=True)  # fmt: skip
    assert cli_main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    header = next(line.split() for line in out.splitlines() if line.startswith("kind "))
    assert header[-1] == "table"
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("q_proj", "embed_tokens"))}
    assert rows["embed_tokens"][-1] == "0.25" and rows["q_proj"][-1] == "1"


def test_registry_builds_all_three_on_one_artifact(saved):
    for name, kw in (("learned", {}), ("learned-random", {"net_seed": 3}), ("per-block-const", {})):
        model = tiny_llama()
        opt = build_optimizer(name, model, artifact=str(saved[0]), lr=1e-3, **kw)
        loss = opt.step(lambda model=model: lm_loss(model, torch.randint(0, 97, (2, 8))))
        assert torch.isfinite(loss), name
        assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(L2ZOError, match="needs an artifact"):
        build_optimizer("learned", tiny_llama())
