"""`l2zo probe-blocks` end to end on a tiny Llama built from a config, and the `fixed-sigma` optimizer it feeds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers

from l2zo.cli.main import main
from l2zo.engine.blocks import partition
from l2zo.errors import L2ZOError
from l2zo.optim.registry import build_optimizer
from tests.helpers import Quadratic, lm_loss, tiny_llama

ALLOCATIONS = ("mezo", "learned-random", "learned-random-permuted", "learned", "per-block-const", "water-filling",
               "gsl", "hizoo")  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (tied embeddings, default SDPA attention) from a config, with the tiny world's tokenizer."""
    from l2zo.models import load_model

    tok = load_model("tiny").tokenizer
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def artifact(model_dir, tmp_path_factory) -> Path:
    from l2zo.learned.artifact import save_artifact
    from l2zo.learned.net import NetSpec, VarianceNet
    from l2zo.models import load_model

    blocks = partition(load_model(str(model_dir)).model)
    names = [b.name for b in blocks]
    net = VarianceNet(NetSpec(), names, seed=3)
    # The recorded per-kind sigma (per-block-const's source): q_proj 2, down_proj 0.5, the rest 1.
    sigma = torch.tensor([2.0 if "q_proj" in n else 0.5 if "down_proj" in n else 1.0 for n in names])
    return save_artifact(
        tmp_path_factory.mktemp("art") / "artifact", net, blocks, base_model={"name": str(model_dir)},
        meta_config={}, meta_record={}, normalization={"rule": "numel", "batch_size": 4}, sigma=sigma, overwrite=True,
    )  # fmt: skip


def _probe_args(model_dir: Path, artifact: Path, out: Path) -> list[str]:
    return ["probe-blocks", "--model", str(model_dir), "--task", "synth-color", "--num-train", "32",
            "--batch-size", "4", "--max-length", "64", "--states", "0,2", "--pairs", "2", "--probes", "2",
            "--ghg-probes", "1", "--fisher-samples", "1", "--settle", "3", "--horizon", "20",
            "--artifact", str(artifact), "--output", str(out)]  # fmt: skip


@pytest.fixture(scope="module")
def probe_dir(model_dir, artifact, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("probe") / "out"
    assert main(_probe_args(model_dir, artifact, out)) == 0
    return out


def test_probe_blocks_writes_statistics_allocations_and_sigma_files(probe_dir, model_dir):
    from l2zo.models import load_model

    result = json.loads((probe_dir / "probe.json").read_text())
    blocks = partition(load_model(str(model_dir)).model)
    names = [b.name for b in blocks]
    # The probe's blocks are the optimizers' blocks: the tied lm_head is not a block of its own.
    assert [r["name"] for r in result["blocks"]] == names and not any("lm_head" in n for n in names)
    assert set(result["states"]) == {"0", "2"}
    for row in result["blocks"]:
        assert row["fisher"] > 0 and row["noise"] == row["noise"]  # Fisher positive, noise finite
    assert sorted(result["sigma"]) == sorted(ALLOCATIONS)
    n = torch.tensor([float(b.numel) for b in blocks], dtype=torch.float64)
    for name in ALLOCATIONS:
        mapping = json.loads((probe_dir / "sigma" / f"{name}.json").read_text())
        assert sorted(mapping) == sorted(names)
        s = torch.tensor([mapping[b] for b in names], dtype=torch.float64)
        assert float((n * s * s).sum()) == pytest.approx(float(n.sum()), rel=1e-9), name
    rnd = result["sigma"]["learned-random"]
    perm = result["sigma"]["learned-random-permuted"]
    # The same sigmas on other blocks, up to the one constant of the renormalisation.
    ratio = torch.tensor(sorted(perm.values())) / torch.tensor(sorted(rnd.values()))
    torch.testing.assert_close(ratio, ratio[0].expand_as(ratio))
    assert [rnd[b] for b in names] != [perm[b] for b in names]
    # per-block-const takes the artifact's sigma_by_kind: q_proj 4x down_proj before normalisation.
    pbc = result["sigma"]["per-block-const"]
    q = next(b for b in names if "q_proj" in b)
    d = next(b for b in names if "down_proj" in b)
    assert pbc[q] / pbc[d] == pytest.approx(4.0)
    for table in ("hessian", "fisher"):
        scores = result["allocations"][table]
        assert set(scores) == set(ALLOCATIONS)
        m = scores["mezo"]
        if (m["A"] + m["V"]) * m["T"] + 2 * m["Bq"] > 0:
            assert m["R"] == pytest.approx(1.0)
        else:  # a random-init model can have tr(H) < 0: the quadratic model has no optimum and R is undefined
            assert m["R"] is None and table == "hessian"  # NaN, written as null by the strict JSON writer
    assert result["allocations"]["fisher"]["mezo"]["R"] == pytest.approx(1.0)
    assert result["allocations"]["kstep"]["mezo"]["R_K"] == pytest.approx(1.0)
    md = (probe_dir / "probe.md").read_text()
    assert "## Allocations" in md and "| `gsl` |" in md and "## Blocks" in md


def test_an_allocation_runs_in_compare_as_fixed_sigma(probe_dir, model_dir, tmp_path):
    logdir = tmp_path / "cmp"
    sigma = probe_dir / "sigma" / "gsl.json"
    rc = main(["compare", "--model", str(model_dir), "--task", "synth-color", "--num-train", "16", "--num-dev", "8",
               "--num-test", "8", "--batch-size", "4", "--max-length", "64", "--steps", "2", "--eval-every", "2",
               "--optimizers", f"mezo:lr=1e-3,fixed-sigma:sigma_file={sigma}:lr=1e-3", "--logdir", str(logdir)])  # fmt: skip
    assert rc == 0
    summary = json.loads((logdir / "fixed-sigma" / "seed0" / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps_done"] == 2


def test_probe_blocks_refuses_an_existing_output(probe_dir, model_dir, capsys):
    rc = main(["probe-blocks", "--model", str(model_dir), "--task", "synth-color", "--output", str(probe_dir)])
    assert rc == 2 and "already exists" in capsys.readouterr().err


def _same_probe(a: dict, b: dict) -> None:
    for key in ("blocks", "states", "allocations", "sigma", "oracle_params"):
        assert a[key] == b[key], key


def test_an_interrupted_probe_records_it_and_resumes_to_the_same_bits(probe_dir, model_dir, artifact, tmp_path,
                                                                      monkeypatch, capsys):  # fmt: skip
    import signal

    import l2zo.blockstats.probe as probe
    from l2zo.utils.runstatus import RunInterrupted

    real, calls = probe.measure_pair, []

    def stop_at_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RunInterrupted(signal.SIGTERM)
        return real(*args, **kwargs)

    out = tmp_path / "probe"
    monkeypatch.setattr(probe, "measure_pair", stop_at_the_third)
    assert main(_probe_args(model_dir, artifact, out)) == 143
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "interrupted" and status["pairs_done"] == 2 and status["pairs_total"] == 4
    assert sorted(p.name for p in (out / "pairs").iterdir()) == ["state0-pair0.pt", "state0-pair1.pt"]
    assert not (out / "probe.json").exists()
    assert main(_probe_args(model_dir, artifact, out)) == 2  # neither --resume nor --overwrite
    assert "--resume" in capsys.readouterr().err
    calls.clear()
    assert main([*_probe_args(model_dir, artifact, out), "--resume"]) == 0
    assert len(calls) == 2  # only state 2's pairs were measured
    _same_probe(json.loads((out / "probe.json").read_text()), json.loads((probe_dir / "probe.json").read_text()))
    assert json.loads((out / "status.json").read_text())["status"] == "ok"


def test_resume_rescores_a_finished_probe_without_measuring(probe_dir, model_dir, artifact, tmp_path,
                                                             monkeypatch):  # fmt: skip
    import shutil

    import l2zo.blockstats.probe as probe

    out = tmp_path / "again"
    shutil.copytree(probe_dir, out)

    def never(*args, **kwargs):
        raise AssertionError("a saved pair was measured again")

    monkeypatch.setattr(probe, "measure_pair", never)
    assert main([*_probe_args(model_dir, artifact, out), "--resume", "--wf-eta", "1e-3"]) == 0
    result = json.loads((out / "probe.json").read_text())
    assert result["oracle_params"]["water-filling"] == {"eta": 1e-3}
    assert result["blocks"] == json.loads((probe_dir / "probe.json").read_text())["blocks"]


def test_a_resume_stopped_again_keeps_the_outputs_it_would_re_make(probe_dir, model_dir, artifact, tmp_path,
                                                                    monkeypatch):  # fmt: skip
    """Compares read sigma/*.json of a finished probe: a re-scoring resume that is stopped leaves them as they were."""
    import shutil
    import signal

    import l2zo.blockstats.probe as probe
    from l2zo.utils.runstatus import RunInterrupted

    out = tmp_path / "again"
    shutil.copytree(probe_dir, out)
    outputs = [out / "probe.json", out / "probe.md", *(out / "sigma").iterdir()]  # (the config is the new run's)
    before = {p.relative_to(out): p.read_bytes() for p in outputs}
    assert any(p.parts[0] == "sigma" for p in before)

    def stopped(*args, **kwargs):
        raise RunInterrupted(signal.SIGTERM)

    monkeypatch.setattr(probe, "run_probe", stopped)
    assert main([*_probe_args(model_dir, artifact, out), "--resume", "--wf-eta", "1e-3"]) == 143
    assert json.loads((out / "status.json").read_text())["status"] == "interrupted"
    assert {p: (out / p).read_bytes() for p in before} == before


def test_resume_refuses_other_measurement_settings(probe_dir, model_dir, artifact, tmp_path, capsys):
    import shutil

    out = tmp_path / "other"
    shutil.copytree(probe_dir, out)
    args = _probe_args(model_dir, artifact, out)
    args[args.index("--batch-size") + 1] = "8"
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--batch-size: 4 there, 8 now" in err and err.count("\n") == 1
    assert main([*_probe_args(model_dir, artifact, tmp_path / "none"), "--resume"]) == 2
    assert "no probe" in capsys.readouterr().err and not (tmp_path / "none").exists()


def _write(path: Path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def test_fixed_sigma_of_ones_is_mezo_bit_for_bit(tmp_path):
    a, b = tiny_llama(seed=1), tiny_llama(seed=1)
    names = [blk.name for blk in partition(a)]
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    opt_a = build_optimizer("mezo", a, lr=1e-3, seed=5)
    opt_b = build_optimizer("fixed-sigma", b, lr=1e-3, seed=5, sigma_file=_write(tmp_path / "s.json",
                                                                                 dict.fromkeys(names, 1.0)))  # fmt: skip
    for _ in range(3):
        assert torch.equal(opt_a.step(lambda: lm_loss(a, ids)), opt_b.step(lambda: lm_loss(b, ids)))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_fixed_sigma_normalises_and_perturbs_only_where_sigma_is_positive(tmp_path):
    q = Quadratic()
    names = [blk.name for blk in partition(q)]  # "w" (6 entries), "v" (4 entries)
    opt = build_optimizer("fixed-sigma", q, lr=0.05, sigma_file=_write(tmp_path / "s.json", {"w": 2.0, "v": 0.0}))
    assert names == ["w", "v"]
    assert opt.sigma() == pytest.approx([(10 / 6) ** 0.5, 0.0])  # 6 s_w^2 = 6 + 4
    v0 = q.v.detach().clone()
    for _ in range(5):
        opt.step(q.loss)
    assert torch.equal(q.v, v0)
    raw = build_optimizer("fixed-sigma", q, sigma_file=_write(tmp_path / "r.json", {"w": 2.0, "v": 0.5}),
                          normalization="none")  # fmt: skip
    assert raw.sigma() == [2.0, 0.5]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"w": 1.0}, "1 block(s) of this model missing (first: 'v')"),
        ({"w": 1.0, "v": 1.0, "lm_head.weight": 1.0}, "1 unknown block(s) (first: 'lm_head.weight')"),
        ({"w": 1.0, "v": -1.0}, "sigmas must be finite numbers >= 0"),
        ({"w": True, "v": 1.0}, "sigmas must be finite numbers >= 0"),
        ({"w": 0.0, "v": 0.0}, "every block sigma 0"),
        ([1.0, 2.0], "must be a non-empty JSON object"),
    ],
)
def test_fixed_sigma_rejects_bad_files_with_one_clear_line(tmp_path, data, message):
    with pytest.raises(L2ZOError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_optimizer("fixed-sigma", Quadratic(), sigma_file=_write(tmp_path / "s.json", data))


def test_sigma_file_script_scales_whole_block_kinds(model_dir, tmp_path, capsys):
    """scripts/sigma_file.py: MeZO with the embedding damped, as a fixed-sigma file for the model's own blocks."""
    import importlib.util

    from l2zo.models import load_model
    from l2zo.optim.methods.fixed_sigma import kind_sigma

    spec = importlib.util.spec_from_file_location("sigma_file", Path(__file__).parents[1] / "scripts" / "sigma_file.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "damp.json"
    assert script.main(["--model", str(model_dir), "--scale", "embed_tokens=0.25", "--out", str(out)]) == 0
    model = load_model(str(model_dir)).model
    written = json.loads(out.read_text())
    assert list(written) == [b.name for b in partition(model)]
    assert {k: v for k, v in written.items() if v != 1.0} == {"model.embed_tokens.weight": 0.25}
    opt = build_optimizer("fixed-sigma", model, sigma_file=str(out))  # normalised: the embedding at 1/4 of the rest
    assert opt.sigma()[0] == pytest.approx(opt.sigma()[1] / 4)
    # Bad input: one line, exit 2, no file.
    for bad, message in ((["--scale", "embed=0.25"], "no block of kind 'embed'"), (["--scale", "q_proj"], "KIND=SIGMA"),
                         (["--scale", "q_proj=-1"], "finite numbers >= 0")):  # fmt: skip
        assert script.main(["--model", str(model_dir), *bad, "--out", str(tmp_path / "bad.json")]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]  # (the rest: the loading bar)
        assert len(errors) == 1 and message in errors[0] and not (tmp_path / "bad.json").exists()
    assert kind_sigma(["a.q_proj.weight", "a.k_proj.weight"], {"q_proj": 2.0}, default=0.5) == [2.0, 0.5]


def test_fixed_sigma_needs_a_readable_file(tmp_path):
    with pytest.raises(L2ZOError, match="needs a sigma file"):
        build_optimizer("fixed-sigma", Quadratic())
    with pytest.raises(L2ZOError, match="sigma file not found"):
        build_optimizer("fixed-sigma", Quadratic(), sigma_file=str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(L2ZOError, match="not valid JSON"):
        build_optimizer("fixed-sigma", Quadratic(), sigma_file=str(tmp_path / "bad.json"))


def _as_task(probe: dict, task: str, loss: float, r_by_label: dict[str, float]) -> dict:
    """A copy of a real probe.json relabelled as another task, with its start loss and learned-k R replaced."""
    p = json.loads(json.dumps(probe))
    p["task"] = task
    p["states"][min(p["states"], key=int)]["loss"] = loss
    for label, r in r_by_label.items():
        p["allocations"]["fisher"][label]["R"] = r
    return p


def test_rank_artifacts_scores_by_mean_r_over_unsaturated_tasks(probe_dir):
    from l2zo.blockstats.select import rank_artifacts

    real = json.loads((probe_dir / "probe.json").read_text())
    real["config"]["artifacts"] = ["a", "b"]
    fisher = real["allocations"]["fisher"]
    fisher["learned-1"], fisher["learned-2"] = dict(fisher["learned"]), dict(fisher["learned"])  # two artifacts
    probes = [_as_task(real, "t1", 2.0, {"learned-1": 1.5, "learned-2": 1.0}),
              _as_task(real, "t2", 0.5, {"learned-1": 0.7, "learned-2": 1.0}),
              # saturated: its R would flip the ranking, and it is left out
              _as_task(real, "t3", 0.01, {"learned-1": 0.1, "learned-2": 9.0})]  # fmt: skip
    scores, kept = rank_artifacts(probes, min_loss=0.1)
    assert kept == ["t1", "t2"]
    assert [s.artifact for s in scores] == ["a", "b"]
    assert scores[0].score == pytest.approx(1.1) and scores[1].score == pytest.approx(1.0)
    assert scores[1].per_task == {"t1": 1.0, "t2": 1.0, "t3": 9.0}
    scores, kept = rank_artifacts(probes, min_loss=0.0)  # t3 kept: b first
    assert [s.artifact for s in scores] == ["b", "a"] and kept == ["t1", "t2", "t3"]


def test_rank_artifacts_script_and_its_one_line_errors(probe_dir, tmp_path, capsys):
    mod = _script("rank_artifacts")
    out = tmp_path / "ranking.md"
    assert mod.main([str(probe_dir), "--out", str(out), "--min-loss", "0"]) == 0
    text = out.read_text()
    assert "synth-color" in text and text.count("| `") == 1  # one artifact row
    assert mod.main([str(tmp_path / "nothing")]) == 2
    assert "holds no probe.json" in capsys.readouterr().err.strip().splitlines()[-1]
    # two probes that score other artifacts: refused, naming the fix
    other = tmp_path / "other"
    other.mkdir()
    p = json.loads((probe_dir / "probe.json").read_text())
    p["task"], p["config"]["artifacts"] = "synth-size", ["elsewhere"]
    (other / "probe.json").write_text(json.dumps(p))
    assert mod.main([str(probe_dir), str(other)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert mod.main([str(probe_dir), str(probe_dir)]) == 2
    assert "same task" in capsys.readouterr().err


def test_transfer_oracle_from_saved_pairs_matches_the_probes_gsl(probe_dir):
    """The GS-L oracle rebuilt from OUTPUT/pairs without the model is the one the probe wrote (sigma/gsl.json)."""
    from l2zo.blockstats.transfer import (
        agreement,
        cross_gain,
        leave_one_out_gain,
        oracle_log_s,
        pearson,
        pooled_stats,
        read_pairs,
        split_half,
    )

    probe = json.loads((probe_dir / "probe.json").read_text())
    names, numels = [b["name"] for b in probe["blocks"]], [int(b["n"]) for b in probe["blocks"]]
    pairs = read_pairs(probe_dir / "pairs", len(names))
    assert [(s, k) for s, k, _ in pairs] == [(0, 0), (0, 1), (2, 0), (2, 1)]  # --states 0,2 --pairs 2
    temperature = probe["oracle_params"]["gsl"]["temperature"]
    curvature = "fisher" if probe["allocations"]["fisher"] else "hessian"
    got = oracle_log_s(names, numels, [p for *_, p in pairs], temperature=temperature, curvature=curvature)
    written = json.loads((probe_dir / "sigma" / "gsl.json").read_text())
    want = torch.log(torch.tensor([written[n] for n in names], dtype=torch.float64).clamp_min(1e-3))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    # its one-step gain on the task's own statistics is the R the probe reported for gsl
    stats = pooled_stats(names, numels, [p for *_, p in pairs], curvature)
    own = probe["allocations"][curvature]["gsl"]["R"]
    assert float(cross_gain({"t": got}, {"t": stats})[0, 0]) == pytest.approx(own, rel=1e-6)
    # R_K from the saved pairs is the probe's K-step score of the allocation it wrote; MeZO's own is 1
    from l2zo.blockstats.transfer import kstep_ratio

    s_written = torch.tensor([written[n] for n in names], dtype=torch.float64)
    horizon = probe["config"]["horizon"]
    assert probe["curvature"] == curvature  # the probe's K-step model used the same curvature
    r_k = probe["allocations"]["kstep"]["gsl"]["R_K"]
    assert kstep_ratio(s_written, stats, horizon) == pytest.approx(r_k, rel=1e-6)
    assert kstep_ratio(torch.ones_like(s_written), stats, horizon) == pytest.approx(1.0)
    # two copies of the task: the other's consensus is the same oracle, so the same R; MeZO's own allocation gives 1
    loo = leave_one_out_gain({"t": got, "u": torch.zeros_like(got)}, {"t": stats, "u": stats})
    assert loo["t"] == pytest.approx(1.0) and loo["u"] == pytest.approx(own, rel=1e-6)
    r = split_half(names, numels, pairs, temperature=temperature, curvature=curvature)
    assert -1.0 <= r <= 1.0
    m = agreement({"a": got, "b": -got, "c": 2 * got + 1})
    torch.testing.assert_close(m, torch.tensor([[1.0, -1, 1], [-1, 1, -1], [1, -1, 1]], dtype=torch.float64))
    assert math.isnan(pearson(torch.ones(3), torch.arange(3.0)))


def _script(name: str):
    """scripts/<name>.py as a module (scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(f"scripts/{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _relabelled(probe: Path, folder: Path, task: str = "synth-size") -> Path:
    """A copy of a finished probe that claims another task: a second "task" whose oracle equals the first's."""
    import shutil

    shutil.copytree(probe, folder)
    p = json.loads((folder / "probe.json").read_text())
    p["task"] = task
    (folder / "probe.json").write_text(json.dumps(p))
    return folder


def test_allocation_transfer_script_tables_and_one_line_errors(probe_dir, tmp_path, capsys):
    import shutil

    mod = _script("allocation_transfer")
    # a second "task": the same probe relabelled; its oracle equals the first's, so they correlate at +1.00
    other = _relabelled(probe_dir, tmp_path / "other")
    out = tmp_path / "t.md"
    assert mod.main([str(probe_dir), str(other), "--allocation", "learned", "--out", str(out)]) == 0
    text = out.read_text()
    assert "split-half" in text and "`learned`" in text
    assert text.count("+1.00") == 16  # the four 2x2 correlation matrices (oracle, curvature, G, learned): all +1.00
    assert "consensus of the other tasks" in text
    # --write-sigma: fixed-sigma files; with two tasks each one's consensus is the other's oracle
    from l2zo.optim.methods.fixed_sigma import read_sigma_file

    sig = tmp_path / "sig"
    assert mod.main([str(probe_dir), str(other), "--write-sigma", str(sig)]) == 0
    assert sorted(p.name for p in sig.iterdir()) == ["consensus-synth-color.json", "consensus-synth-size.json",
                                                      "oracle-synth-color.json", "oracle-synth-size.json",
                                                      "own-g-synth-color.json", "own-g-synth-size.json"]  # fmt: skip
    # the two "tasks" are one probe: its own G with the other's curvature is its oracle (which the oracle files
    # write with switched-off blocks at the 1e-3 floor of log s)
    own_g, oracle = read_sigma_file(sig / "own-g-synth-color.json"), read_sigma_file(sig / "oracle-synth-color.json")
    assert {k: max(v, 1e-3) for k, v in own_g.items()} == pytest.approx(oracle)
    assert "Which half of the oracle" in out.read_text()
    assert read_sigma_file(sig / "consensus-synth-color.json") == pytest.approx(
        read_sigma_file(sig / "oracle-synth-size.json")
    )
    assert mod.main([str(probe_dir), str(probe_dir)]) == 2
    assert "two probes of" in capsys.readouterr().err
    assert mod.main([str(probe_dir), "--allocation", "nope"]) == 2
    assert "has no allocation 'nope'" in capsys.readouterr().err
    empty = tmp_path / "empty"
    shutil.copytree(probe_dir, empty)
    shutil.rmtree(empty / "pairs")
    (empty / "pairs").mkdir()
    assert mod.main([str(empty)]) == 2
    assert "holds no probe pairs" in capsys.readouterr().err.strip().splitlines()[-1]


def test_allocation_transfer_kstep_opt_writes_the_fitted_allocations(probe_dir, tmp_path, capsys):
    from l2zo.blockstats.allocations import permute_sigma
    from l2zo.optim.methods.fixed_sigma import read_sigma_file

    mod = _script("allocation_transfer")
    other = _relabelled(probe_dir, tmp_path / "other")
    sig, out = tmp_path / "sig", tmp_path / "t.md"
    argv = [str(probe_dir), str(other), "--kstep-opt", "synth-color", "--kstep-iters", "20"]
    assert mod.main([*argv, "--write-sigma", str(sig), "--out", str(out)]) == 0
    assert "maximise R_K" in out.read_text() and "| kopt-permuted |" in out.read_text()
    files = {p.name for p in sig.iterdir()}
    assert {"kopt-own-synth-color.json", "kopt-others-synth-color.json", "kopt-permuted-synth-color.json"} <= files
    assert not any(f.startswith("kopt") and "synth-size" in f for f in files)  # only the task asked for
    # the two "tasks" are one probe: fitted on the other one or on itself, the allocation is the same
    own, others = (read_sigma_file(sig / f"kopt-{k}-synth-color.json") for k in ("own", "others"))
    assert own == pytest.approx(others)
    names = list(others)
    s = torch.tensor([others[k] for k in names], dtype=torch.float64)
    numel = {b["name"]: int(b["n"]) for b in json.loads((probe_dir / "probe.json").read_text())["blocks"]}
    n = torch.tensor([numel[k] for k in names], dtype=torch.float64)
    perm = read_sigma_file(sig / "kopt-permuted-synth-color.json")
    assert [perm[k] for k in names] == pytest.approx(permute_sigma(s, n).tolist())
    assert mod.main([*argv[:2], "--kstep-opt", "synth-nope"]) == 2
    assert "--kstep-opt names task(s) not probed here: synth-nope" in capsys.readouterr().err


def _task_stats(G, tau, n=(10.0, 20.0, 30.0, 40.0)):
    from l2zo.blockstats.stats import BlockStats

    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    nan = torch.full((len(G),), math.nan, dtype=torch.float64)
    return BlockStats(
        names=tuple(f"b{i}" for i in range(len(G))), kinds=("w",) * len(G), n=t(n), G=t(G), noise=t([0.5] * len(G)),
        tau=t(tau), gHg=t([0.1] * len(G)), G_se=nan, noise_se=nan, tau_se=nan, gHg_se=nan, fisher=t(tau),
        gFg=t([0.1] * len(G)), fisher_se=nan, gFg_se=nan, loss=1.0, pairs=1, probes=1,
    )  # fmt: skip


def test_decompose_gain_attributes_the_task_specific_half():
    """Tasks that share curvature and differ in G: own-G is the oracle, and neither is the others' consensus."""
    from l2zo.blockstats.gain import gain_ratio
    from l2zo.blockstats.oracles import gsl
    from l2zo.blockstats.transfer import VARIANTS, decompose_gain, leave_one_out_variants, log_gradient_share

    tau = [1.0, 8.0, 3.0, 20.0]
    tasks = {"a": _task_stats([4.0, 0.1, 1.0, 2.0], tau), "b": _task_stats([0.1, 3.0, 2.0, 0.5], tau),
             "c": _task_stats([1.0, 1.0, 0.2, 5.0], tau)}  # fmt: skip
    r = decompose_gain(tasks, temperature=0.5)
    for t, st in tasks.items():
        own = float(gain_ratio(gsl(st, 0.5), st))
        assert r[t]["own"] == pytest.approx(own) and r[t]["own-G"] == pytest.approx(own)
        assert r[t]["own-curvature"] == pytest.approx(r[t]["neither"])
        assert r[t]["own"] > 1.0  # the oracle beats MeZO on its own statistics
    # the gradient shares differ here, so taking them from the other tasks costs gain on every task
    assert all(r[t]["neither"] < r[t]["own"] for t in tasks)
    # shared G, different curvature: the roles swap
    g = [4.0, 0.1, 1.0, 2.0]
    swapped = {"a": _task_stats(g, [1.0, 8.0, 3.0, 20.0]), "b": _task_stats(g, [9.0, 1.0, 3.0, 2.0]),
               "c": _task_stats(g, [2.0, 2.0, 30.0, 1.0])}  # fmt: skip
    v = leave_one_out_variants(swapped)
    for t in swapped:
        torch.testing.assert_close(v[t]["own-curvature"], v[t]["own"])
        torch.testing.assert_close(v[t]["neither"], v[t]["own-G"])
    # G <= 0 blocks get the floor share, not -inf; a probe with no signal at all is refused in one line
    share = log_gradient_share(_task_stats([-1.0, 0.0, 2.0, 2.0], tau))
    assert torch.isfinite(share).all() and float(share[0]) == pytest.approx(math.log(0.5e-3))
    with pytest.raises(L2ZOError, match="no block has G_b > 0"):
        log_gradient_share(_task_stats([-1.0, 0.0, -2.0, 0.0], tau))
    with pytest.raises(L2ZOError, match="at least two tasks"):
        decompose_gain({"a": tasks["a"]})
    # zo-G: a forward-only G equal to the backprop one is own-G; a budget curve over its pairs counts their forwards
    from l2zo.blockstats.transfer import zo_budget_gain
    from l2zo.blockstats.zo_energy import ZOEnergy

    r = decompose_gain(tasks, measured_G={"a": tasks["a"].G}, horizon=10)
    assert r["a"]["zo-G"] == pytest.approx(r["a"]["own-G"]) and "zo-G" not in r["b"]
    assert r["a"]["zo-G@K"] == pytest.approx(r["a"]["own-G@K"]) and set(r["b"]) == {
        *VARIANTS[:4],
        *(f"{v}@K" for v in VARIANTS[:4]),
    }
    exact = ZOEnergy(G=tasks["a"].G, sq=tasks["a"].G, G_se=tasks["a"].G, probes=2, forwards=32)
    flipped = ZOEnergy(G=-tasks["a"].G, sq=tasks["a"].G, G_se=tasks["a"].G, probes=2, forwards=32)
    curve = zo_budget_gain(tasks, {"a": [exact, exact, exact]}, (1, 2, 8), horizon=10)
    assert sorted(curve["a"]) == [1, 2] and curve["a"][2]["forwards"] == 64
    assert curve["a"][1]["zo-G"] == pytest.approx(r["a"]["own-G"]) and "zo-own" not in curve["a"][1]
    assert curve["a"][1]["zo-G@K"] == pytest.approx(r["a"]["own-G@K"])
    assert math.isnan(zo_budget_gain(tasks, {"a": [flipped]}, (1,))["a"][1]["zo-G"])  # no positive G: no allocation
    # with the task's own Fisher measured forward-only and exact, zo-own is the task's oracle
    with_f = ZOEnergy(G=tasks["a"].G, sq=tasks["a"].G, G_se=tasks["a"].G, probes=2, forwards=66, fisher=tasks["a"].tau)
    own = zo_budget_gain(tasks, {"a": [with_f]}, (1,), horizon=10)["a"][1]
    assert own["zo-own"] == pytest.approx(r["a"]["own"]) and own["zo-own@K"] == pytest.approx(r["a"]["own@K"])


def test_zo_probes_add_a_forward_only_G_to_a_finished_probe_on_resume(probe_dir, model_dir, artifact, tmp_path,
                                                                       capsys):  # fmt: skip
    """--resume --zo-probes on a finished probe: the backprop pairs are loaded, not re-measured, and each batch pair's
    forward-only G is measured on the same batches (the draws replayed) and saved beside it; a second resume
    loads those too and gives the same numbers."""
    import shutil

    out = tmp_path / "zo"
    shutil.copytree(probe_dir, out)
    assert main([*_probe_args(model_dir, artifact, out), "--resume", "--zo-probes", "2"]) == 0
    first = json.loads((out / "probe.json").read_text())
    before = json.loads((probe_dir / "probe.json").read_text())
    assert first["blocks"] == before["blocks"]  # the backprop statistics are the saved ones
    zo = first["zo"]
    B = first["num_blocks"]
    # a classification task: the Fisher half too (twice the G probe's forwards, plus one label draw per batch)
    assert (
        zo["pairs"] == 4 and zo["forwards_per_pair"] == 8 * 2 * B + 2 and zo["forwards"] == 4 * zo["forwards_per_pair"]
    )
    assert -1.0 <= zo["fisher"]["corr"] <= 1.0 and len(zo["fisher"]["per_block"]) == B
    assert all(f > 0 for f in zo["fisher"]["per_block"])  # a sum of squares, times B
    assert "gsl-zo-fisher" in first["sigma"] and "tr(F_bb) forward-only" in (out / "probe.md").read_text()
    assert -1.0 <= zo["share_corr"] <= 1.0
    assert sorted(p.name for p in (out / "pairs").glob("*-zo.pt")) == sorted(
        f"state{s}-pair{k}-zo.pt" for s in (0, 2) for k in (0, 1)
    )
    assert "gsl-zo" in first["sigma"] and (out / "sigma" / "gsl-zo.json").is_file()
    assert "Forward-only G" in (out / "probe.md").read_text()
    assert main([*_probe_args(model_dir, artifact, out), "--resume", "--zo-probes", "2"]) == 0
    again = json.loads((out / "probe.json").read_text())
    assert again["zo"]["blocks"] == zo["blocks"]
    assert main([*_probe_args(model_dir, artifact, out), "--resume", "--zo-probes", "-1"]) == 2
    assert "--zo-probes must be >= 0" in capsys.readouterr().err
    # allocation_transfer reads the forward-only G: a zo-G column, its budget curve and zo-g fixed-sigma files
    mod = _script("allocation_transfer")
    other = _relabelled(probe_dir, tmp_path / "other")
    assert (
        mod.main([str(out), str(other), "--write-sigma", str(tmp_path / "sig"), "--out", str(tmp_path / "t.md")]) == 0
    )
    text = (tmp_path / "t.md").read_text()
    assert (
        "| zo-G |" in text
        and "first P batch pairs" in text
        and "scored by R_K" in text
        and f"({zo['forwards_per_pair']} fwd)" in text
    )
    assert (tmp_path / "sig" / "zo-g-synth-color.json").is_file() and (
        tmp_path / "sig" / "zo-own-synth-color.json"
    ).is_file()
    assert not (tmp_path / "sig" / "zo-g-synth-size.json").exists()  # that probe has no forward-only G


def test_kstep_coupling_measures_the_gram_once_and_scores_both_models(probe_dir, tmp_path, capsys):
    mod = _script("kstep_coupling")
    summary = tmp_path / "summary.csv"
    model = json.loads((probe_dir / "probe.json").read_text())["model_name_or_path"]
    rows = [f"{Path(str(model)).name},synth-color,{run},ok,2,1.0,{final},0.0,0.5,0.0,0.1"
            for run, final in (("mezo", 0.8), ("gsl", 0.7), ("hizoo", 0.9))]  # fmt: skip
    header = "model,task,run,status,seeds_ok,dev_loss_initial,dev_loss_final_mean,dev_loss_final_std,test_acc_mean," \
             "test_acc_std,time_per_step_s"  # fmt: skip
    summary.write_text("\n".join([header, *rows]) + "\n")
    gram = tmp_path / "gram.pt"
    args = [str(probe_dir), "--gram", str(gram), "--chunk", "8", "--horizon", "20", "--measured", str(summary),
            "--allocation", f"gsl={probe_dir / 'sigma' / 'gsl.json'}",
            "--allocation", f"hizoo={probe_dir / 'sigma' / 'hizoo.json'}", "--out", str(tmp_path / "t.md")]  # fmt: skip
    code = mod.main(args)
    out = capsys.readouterr()
    assert code == 0, out.err
    text = (tmp_path / "t.md").read_text()
    assert "| gsl |" in text and "| mezo | 1.00 |" in text and "Spearman" in text and text in out.out
    saved = torch.load(gram, weights_only=True)
    assert int(saved["chunks"]) == 4  # 32 train examples in chunks of 8
    assert torch.allclose(saved["gram"], saved["gram"].T, rtol=1e-4, atol=1e-10)  # H is symmetric
    # kept: a second run reads it (bit-identical output), and other settings are refused, in one line
    assert mod.main(args) == code
    assert mod.main([*args[:4], "16", *args[5:]]) == 2
    assert "other settings" in capsys.readouterr().err
    assert mod.main([*args[:-2], "--allocation", "gsl"]) == 2
    assert "LABEL=SIGMA_FILE" in capsys.readouterr().err
    # the fit: on the task itself (kopt-coupled-own), or with --fit-on on other probes (here the same one, so the
    # same allocation) as kopt-coupled-meta
    own, meta = tmp_path / "own.json", tmp_path / "meta.json"
    fit = ["--kstep-opt", "--kstep-iters", "3"]
    assert mod.main([*args, *fit, "--write-sigma", str(own)]) == 0
    assert "| kopt-coupled-own |" in capsys.readouterr().out
    assert mod.main([*args, *fit, "--write-sigma", str(meta), "--fit-on", f"{probe_dir}={gram}"]) == 0
    assert "| kopt-coupled-meta |" in capsys.readouterr().out
    assert json.loads(meta.read_text()) == json.loads(own.read_text())
    shuffled = tmp_path / "perm.json"
    assert mod.main([*args, "--permuted", f"gsl={shuffled}"]) == 0
    assert "| gsl-permuted |" in capsys.readouterr().out
    gsl, perm = json.loads((probe_dir / "sigma" / "gsl.json").read_text()), json.loads(shuffled.read_text())
    assert perm.keys() == gsl.keys()
    ratios = [p / g for p, g in zip(sorted(perm.values()), sorted(gsl.values()), strict=True) if g > 0]
    assert max(ratios) == pytest.approx(min(ratios))  # the same sigmas, rescaled by the renormalisation
    assert any(perm[k] != pytest.approx(ratios[0] * gsl[k]) for k in gsl)  # ... on other blocks
    assert mod.main([*args, "--permuted", f"nope={shuffled}"]) == 2
    capsys.readouterr()
    assert mod.main([*args, "--fit-on", f"{probe_dir}={gram}"]) == 2  # without --kstep-opt
    assert mod.main([*args, *fit, "--fit-on", str(probe_dir)]) == 2
    assert capsys.readouterr().err.count("\n") == 2
    summary.write_text(header + "\n")
    assert mod.main(args) == 2
    assert "no finished mezo row" in capsys.readouterr().err
