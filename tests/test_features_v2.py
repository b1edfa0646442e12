"""Features version 2 (issue 15, item 3): each feature against a direct computation, the net's width and training,
the same features in the learned optimizer and in meta-training, the versioned feature list in the manifest, and
the shipped (unversioned) artifacts loading and behaving as before.

Models are built from configs (tests.helpers.tiny_llama); nothing is downloaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch

from l2zo.blockstats.static import curvature_feature
from l2zo.cli.main import build_parser
from l2zo.config.parser import build_config, from_namespace
from l2zo.engine import ZSource, partition
from l2zo.errors import L2ZOError
from l2zo.learned import NetSpec, VarianceNet, block_weights, read_artifact, read_manifest, save_artifact
from l2zo.learned.artifact import MANIFEST_FILE, evaluate_sigma, stored_stats
from l2zo.learned.drift import DriftTracker, ExactAnchor
from l2zo.learned.features import (
    FEATURE_NAMES,
    FEATURES_VERSION,
    GRAD_RMS_BETA,
    FeatureExtras,
    FeatureSpec,
    GradRMS,
    build_features,
    weight_stats,
)
from l2zo.learned.meta import SigmaNorm, TaskState, greedy_meta_loss, predict_sigma, task_features
from l2zo.learned.meta_config import MetaTrainConfig
from l2zo.learned.trajectory import PretrainedCopy
from l2zo.optim.methods.learned import LearnedZO
from tests.helpers import lm_loss, tiny_llama

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
# Artifacts written before features_version existed, kept beside the results they produced: the tiny one shipped
# until stop 22 (plain greedy; the role-embedding net replaced it) and the SmolLM2 on-policy one.
UNVERSIONED = [RESULTS / "meta-tiny" / "tiny-greedy-v1", RESULTS / "meta-smollm2-135m-onpolicy"]
# Versioned (features_version 2) artifacts with the paper's five inputs: tiny's plain greedy recipe re-made, and the
# SmolLM2 one shipped until stop 22, which the first held-out runs (docs/results/heldout-smollm2) used.
PAPER_INPUTS = [RESULTS / "meta-tiny" / "tiny-greedy", RESULTS / "meta-smollm2-135m-greedy"]
ALL_ON = FeatureSpec(log_numel=True, weight_norm=True, drift=True, curvature="fisher", grad_rms=True)
ONE_EACH = {
    "log_numel": FeatureSpec(log_numel=True),
    "weight_norm": FeatureSpec(weight_norm=True),
    "drift": FeatureSpec(drift=True),
    "static_curvature": FeatureSpec(curvature="hessian"),
    "grad_rms": FeatureSpec(grad_rms=True),
}


def _batch(seed: int = 0, vocab: int = 97) -> torch.Tensor:
    return torch.randint(0, vocab, (4, 12), generator=torch.Generator().manual_seed(seed))


def _net(spec: FeatureSpec, blocks, seed: int = 1, **net_kw) -> VarianceNet:
    net = VarianceNet(NetSpec(features=spec, **net_kw), [b.name for b in blocks], seed=seed)
    if spec.static_curvature:  # a stand-in for a measurement: any fixed per-block values
        net.static_curvature.copy_(torch.linspace(-1.0, 1.0, len(blocks)))
    return net


# ------------------------------------------------------------------------------------ each feature's value


def test_log_numel_and_weight_norm_against_direct_computation() -> None:
    blocks = partition(tiny_llama(seed=2))
    spec = FeatureSpec(log_numel=True, weight_norm=True)
    numel = torch.tensor([float(b.numel) for b in blocks])
    feats = build_features(weight_stats(blocks), 0.0, 0.0, torch.ones(len(blocks)), spec, None, FeatureExtras(numel))
    assert spec.names() == (*FEATURE_NAMES, "log_numel", "weight_norm") and feats.shape == (len(blocks), 7)
    direct_log = torch.tensor([math.log(b.param.numel()) for b in blocks])
    direct_norm = torch.stack([b.param.detach().double().norm() / math.sqrt(b.param.numel()) for b in blocks])
    torch.testing.assert_close(feats[:, 5], direct_log.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(feats[:, 6].double(), direct_norm, rtol=2e-5, atol=0)


def test_grad_rms_is_the_bias_corrected_running_rms_of_g() -> None:
    gs = [0.3, -2.0, 0.05, 1.7]
    rms = GradRMS()
    assert rms.feature() == 0.0  # before the first step, as the paper's zero losses
    m = 0.0
    for t, g in enumerate(gs, start=1):
        rms.observe(g)
        m = GRAD_RMS_BETA * m + (1 - GRAD_RMS_BETA) * g * g
        assert rms.feature() == pytest.approx(math.log1p(math.sqrt(m / (1 - GRAD_RMS_BETA**t))), rel=1e-12)
    assert GradRMS.from_state(rms.state_dict()) == rms


def _run_learned(spec: FeatureSpec, steps: int, exact_numel: int, hidden: int = 16, seed: int = 0):
    model = tiny_llama(seed=seed, hidden=hidden)
    blocks = partition(model)
    theta0 = [b.param.detach().clone() for b in blocks]
    opt = LearnedZO(model, _net(spec, blocks), lr=3e-2, eps=1e-3, seed=seed, drift_exact_numel=exact_numel)
    ids = _batch(seed)
    gs = []
    for _ in range(steps):
        opt.step(lambda: lm_loss(model, ids))
        gs.append(opt.last_probe.projected_grad)
    return model, blocks, theta0, opt, gs


def test_drift_exact_and_grad_rms_in_the_optimizer_against_direct_computation() -> None:
    spec = FeatureSpec(drift=True, grad_rms=True)
    _, blocks, theta0, opt, gs = _run_learned(spec, steps=4, exact_numel=10**9)
    feats = opt.features()
    direct = torch.stack([(b.param.detach().double() - t.double()).norm() / t.double().norm()
                          for b, t in zip(blocks, theta0)])  # fmt: skip
    assert bool((direct > 0).all())
    torch.testing.assert_close(feats[:, 5].double(), direct, rtol=1e-5, atol=0)
    rms = GradRMS()
    for g in gs:
        rms.observe(g)
    assert bool((feats[:, 6] == torch.tensor(rms.feature(), dtype=torch.float32)).all())


def test_drift_estimate_of_large_blocks_tracks_the_true_drift_and_small_blocks_stay_exact() -> None:
    # hidden 64: the matrices have 2048-16384 entries (estimated), the norm gains 64 (exact under the threshold).
    _, blocks, theta0, opt, _ = _run_learned(FeatureSpec(drift=True), steps=6, exact_numel=1000, hidden=64)
    feats = opt.features()[:, 5].double()
    direct = torch.stack([(b.param.detach().double() - t.double()).norm() / t.double().norm()
                          for b, t in zip(blocks, theta0)])  # fmt: skip
    small = [i for i, b in enumerate(blocks) if b.numel <= 1000]
    large = [i for i, b in enumerate(blocks) if b.numel > 1000]
    assert small and large and set(small) == set(opt.drift.theta0)
    torch.testing.assert_close(feats[small], direct[small], rtol=1e-5, atol=0)
    # The random-walk estimate drops the cross terms: about 1/sqrt(n_b) + t/n_b relative error (module doc).
    torch.testing.assert_close(feats[large], direct[large], rtol=0.1, atol=0)


def test_drift_tracker_state_round_trip_resumes_the_same_drift() -> None:
    _, blocks, _, opt, _ = _run_learned(FeatureSpec(drift=True), steps=2, exact_numel=1000, hidden=64)
    fresh = DriftTracker(blocks, 1000)  # built at the current weights: another theta_0 until the state is loaded
    fresh.load_state_dict(opt.drift.state_dict())
    params = [b.param for b in blocks]
    assert torch.equal(fresh.drift(params), opt.drift.drift(params))


def test_static_curvature_feature_is_the_centred_log_per_element_curvature() -> None:
    trace = torch.tensor([4.0, 1.0, 0.5, 8.0], dtype=torch.float64)
    n = torch.tensor([4.0, 2.0, 1.0, 2.0], dtype=torch.float64)
    feature, per_element = curvature_feature(trace, n)
    l = trace / n
    torch.testing.assert_close(per_element, l)
    torch.testing.assert_close(feature.double(), l.log() - l.log().mean(), rtol=1e-6, atol=1e-7)
    # A negative (unresolved Hessian) block is floored at 1e-3 x the median positive l, not dropped.
    feature, per_element = curvature_feature(torch.tensor([4.0, -1.0, 0.5, 8.0], dtype=torch.float64), n)
    assert float(per_element[1]) == pytest.approx(1e-3 * float(l[[0, 2, 3]].median()))
    assert bool(torch.isfinite(feature).all())


# ------------------------------------------------------------------------------------ the net with each option


@pytest.mark.parametrize("name", [*ONE_EACH, "all"])
def test_net_with_each_feature_has_its_width_and_one_greedy_meta_step_changes_it(name: str) -> None:
    spec = ALL_ON if name == "all" else ONE_EACH[name]
    model = tiny_llama(seed=3)
    blocks = partition(model)
    net = _net(spec, blocks, depth_feature=True)
    assert net.w1.shape[1] == net.spec.num_inputs == len(spec.names()) + 1 == (11 if name == "all" else 7)
    assert name == "all" or spec.names()[-1] == name
    before = [p.detach().clone() for p in net.parameters()]
    state = TaskState(anchor=ExactAnchor(PretrainedCopy(blocks).values))
    ids = _batch(3)
    norm = SigmaNorm(block_weights(blocks, "numel"))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(2):  # the second step sees a recorded history (losses, g) and a moved theta
        res = greedy_meta_loss(model, blocks, net, state, norm, lambda m: lm_loss(m, ids), lambda m: lm_loss(m, ids),
                               seed=step, eps=1e-3, lr=0.5, zsrc=ZSource())  # fmt: skip
        opt.zero_grad()
        res.meta_loss.backward()
        opt.step()
        state.record(res.probe, res.sigma.raw)
        with torch.no_grad():
            for b in blocks:
                b.param.add_(1e-3 * torch.randn_like(b.param))
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, net.parameters()))


def test_drift_without_theta0_is_a_clear_error() -> None:
    blocks = partition(tiny_llama())
    net = _net(FeatureSpec(drift=True), blocks)
    with pytest.raises(L2ZOError, match="theta_0"):
        predict_sigma(net, blocks, TaskState(), SigmaNorm(block_weights(blocks, "numel")))


# ------------------------------------------------------------------------------------ one definition, two sites


def test_learned_optimizer_and_meta_training_compute_identical_features() -> None:
    model = tiny_llama(seed=4)
    blocks = partition(model)
    net = _net(ALL_ON, blocks)
    anchor = ExactAnchor(PretrainedCopy(blocks).values)  # meta-training's theta_0: the pretrained copy
    opt = LearnedZO(model, net, lr=3e-2, eps=1e-3, seed=4, drift_exact_numel=10**9)
    state = TaskState(anchor=anchor)
    norm = SigmaNorm(opt.n)
    ids = _batch(4)
    for step in range(4):
        feats = opt.features()
        assert torch.equal(task_features(net, blocks, state), feats), step
        assert torch.equal(predict_sigma(net, blocks, state, norm).raw, opt.raw_sigma()), step
        opt.step(lambda: lm_loss(model, ids))
        state.record(opt.last_probe, opt.sigma_prev)  # what meta-training records after its probe
    assert float(opt.features()[:, 7].abs().max()) > 0  # the drift moved


# ------------------------------------------------------------------------------------ the manifest


def _save(tmp_path: Path, spec: FeatureSpec, name: str = "art") -> tuple[Path, VarianceNet]:
    model = tiny_llama(seed=5)
    blocks = partition(model)
    net = _net(spec, blocks, seed=5)
    path = save_artifact(tmp_path / name, net, blocks, base_model={"name": "tiny-test"}, meta_config={},
                         meta_record={"steps": 0}, normalization={"rule": "numel", "batch_size": 4})  # fmt: skip
    return path, net


def test_manifest_records_the_ordered_feature_list_and_round_trips(tmp_path: Path) -> None:
    path, net = _save(tmp_path, ALL_ON)
    manifest = read_manifest(path)
    assert manifest["net"]["feature_names"] == [*FEATURE_NAMES, "log_numel", "weight_norm", "drift",
                                                "static_curvature", "grad_rms"]  # fmt: skip
    assert manifest["net"]["features_version"] == FEATURES_VERSION
    assert manifest["net"]["num_inputs"] == 10 and manifest["net"]["features"]["curvature"] == "fisher"
    loaded, _ = read_artifact(path)
    assert loaded.spec == net.spec
    for (k, a), b in zip(net.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k  # the static curvature travels in the safetensors with the weights
    # The default spec records the paper's five, under the current version.
    path, _ = _save(tmp_path, FeatureSpec(), "paper")
    net_d = read_manifest(path)["net"]
    assert net_d["feature_names"] == list(FEATURE_NAMES) and net_d["features_version"] == FEATURES_VERSION


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda n: n["feature_names"].append("activation_outliers"), "activation_outliers"),
        (lambda n: n.update(features_version=FEATURES_VERSION + 1), "features_version"),
        (lambda n: n["feature_names"].reverse(), "trained on features"),
        (lambda n: n["features"].update(tail_index=True), "tail_index"),
    ],
)
def test_an_unknown_feature_list_is_refused_in_one_line(tmp_path: Path, edit, needle: str) -> None:
    path, _ = _save(tmp_path, FeatureSpec(log_numel=True))
    file = path / MANIFEST_FILE
    manifest = json.loads(file.read_text())
    edit(manifest["net"])
    file.write_text(json.dumps(manifest))
    with pytest.raises(L2ZOError) as info:
        read_artifact(path)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg and ("re-meta-train" in msg or "l2zo version" in msg)


def test_meta_train_flags_reach_the_net_spec() -> None:
    from l2zo.train.meta_train import feature_spec

    args = build_parser().parse_args(["meta-train", "--feature-log-numel", "true", "--feature-weight-norm", "true",
                                      "--feature-drift", "true", "--feature-curvature", "hessian",
                                      "--feature-grad-rms", "true"])  # fmt: skip
    cfg = from_namespace(MetaTrainConfig, args)
    assert feature_spec(cfg) == FeatureSpec(log_numel=True, weight_norm=True, drift=True, curvature="hessian",
                                            grad_rms=True)  # fmt: skip
    assert feature_spec(build_config(MetaTrainConfig)) == FeatureSpec()  # default: the paper's


# ------------------------------------------------------------------------------------ the shipped artifacts


def _paper_sigma(path: Path, stats: torch.Tensor, lp: float, lm: float, prev: torch.Tensor) -> torch.Tensor:
    """The paper's per-block MLP written out from the raw safetensors, independent of VarianceNet and build_features."""
    t = safetensors.torch.load_file(str(path / "variance_net.safetensors"))
    x = torch.stack([stats[:, 0], stats[:, 1], torch.full_like(prev, lp), torch.full_like(prev, lm), prev], dim=1)
    h = torch.tanh(torch.einsum("bf,bfh->bh", x, t["w1"]) + t["b1"])
    return (torch.einsum("bh,bh->b", h, t["w2"]) + t["b2"]).abs()


@pytest.mark.parametrize("path", UNVERSIONED + PAPER_INPUTS, ids=lambda p: p.parent.name + "/" + p.name)
def test_artifacts_with_the_papers_inputs_load_and_give_the_papers_sigma(path: Path) -> None:
    """Unversioned (v1) artifacts and versioned ones with the default inputs are the same network."""
    manifest = read_manifest(path)
    assert manifest["format_version"] == 1
    if path in UNVERSIONED:
        assert "features_version" not in manifest["net"]
    else:
        assert manifest["net"]["features_version"] == 2 and manifest["net"]["feature_names"] == list(FEATURE_NAMES)
    net, _ = read_artifact(path)
    assert net.spec.features == FeatureSpec() and net.spec.num_inputs == 5
    assert not hasattr(net, "static_curvature")
    stats = stored_stats(manifest)
    numel = torch.tensor([float(torch.tensor(s).prod()) for _, s in manifest["base_model"]["blocks"]])
    prev = torch.ones(net.num_blocks)
    for lp, lm in ((0.0, 0.0), (0.9, 0.7)):
        raw = net(build_features(stats, lp, lm, prev, net.spec.features))
        torch.testing.assert_close(raw, _paper_sigma(path, stats, lp, lm, prev), rtol=1e-6, atol=1e-7)
        prev = raw.detach()
    eff = evaluate_sigma(net, stats, numel.double(), loss=0.5, rule="numel", numel=numel)
    assert bool(torch.isfinite(eff).all()) and float(eff.min()) > 0


def test_a_tiny_artifact_with_the_papers_inputs_in_the_optimizer_matches_the_papers_formula() -> None:
    from l2zo.models import load_model
    from l2zo.optim.registry import build_optimizer

    model = load_model("tiny").model
    blocks = partition(model)
    opt = build_optimizer("learned", model, artifact=str(UNVERSIONED[0]), lr=1e-4, eps=1e-3, seed=0)
    ids = _batch(0, vocab=800)
    prev, lp, lm = torch.ones(len(blocks)), 0.0, 0.0
    for _ in range(3):
        # The paper's features, straight from the weights (torch.var_mean), then its MLP.
        var, mean = zip(*[torch.var_mean(b.param.detach().double()) for b in blocks])
        stats = torch.stack([torch.stack(mean), torch.stack(var)], dim=1).float()
        torch.testing.assert_close(
            opt.raw_sigma(), _paper_sigma(UNVERSIONED[0], stats, lp, lm, prev), rtol=1e-5, atol=1e-6
        )
        opt.step(lambda: model(input_ids=ids, labels=ids).loss)
        prev, lp, lm = opt.sigma_prev, float(opt.last_probe.loss_plus), float(opt.last_probe.loss_minus)


# ------------------------------------------------------------------------------------ meta-train -> finetune


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("features_model")
    tiny_llama(vocab=300).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


def test_meta_train_with_every_feature_writes_an_artifact_the_learned_optimizer_runs(model_dir: Path,
                                                                                    tmp_path: Path) -> None:  # fmt: skip
    from l2zo.blockstats.static import CurvatureTask, measure_static_curvature
    from l2zo.models import load_model
    from l2zo.optim.registry import build_optimizer
    from l2zo.tasks.scoring import CandidateScorer
    from l2zo.train.meta_train import load_meta_tasks, run_meta_train

    overrides = {"model": str(model_dir), "tasks": ["synth-sentiment", "synth-parity"], "num_train": 24, "num_dev": 8,
                 "batch_size": 4, "max_length": 40, "steps": 3, "reset_every": 2, "p_teacher": 0.5, "progress": False,
                 "feature_log_numel": True, "feature_weight_norm": True, "feature_drift": True,
                 "feature_curvature": "fisher", "feature_curvature_pairs": 1, "feature_grad_rms": True,
                 "output": str(tmp_path / "artifact"), "logdir": str(tmp_path / "run")}  # fmt: skip
    cfg = build_config(MetaTrainConfig, overrides=overrides)
    path = run_meta_train(cfg)
    manifest = read_manifest(path)
    assert manifest["net"]["feature_names"] == list(ALL_ON.names())
    record = manifest["meta_training"]["static_curvature"]
    assert record["kind"] == "fisher" and record["pairs"] == 2 and min(record["per_element"]) > 0
    net, _ = read_artifact(path)
    assert torch.equal(net.static_curvature, torch.tensor(record["feature"], dtype=torch.float32))
    # The stored curvature is the measurement on the pretrained weights and the meta-training tasks' batches.
    loaded = load_model(str(model_dir), attn_implementation="eager")
    blocks = partition(loaded.model)
    tasks = [CurvatureTask(t.name, t.loss_kind, t.train) for t in load_meta_tasks(cfg)]
    again = measure_static_curvature(loaded.model, blocks, tasks, CandidateScorer(loaded.tokenizer, 40),
                                     kind="fisher", batch_size=4, pairs=1, seed=cfg.seed)  # fmt: skip
    assert torch.equal(again.feature, net.static_curvature)
    # `l2zo finetune --optimizer learned --artifact DIR` builds this optimizer: the same features, nothing measured.
    opt = build_optimizer("learned", loaded.model, artifact=str(path), lr=1e-3, eps=1e-3, seed=0)
    assert isinstance(opt, LearnedZO) and opt.drift is not None
    feats = opt.features()
    assert feats.shape == (len(blocks), 10) and torch.equal(feats[:, 8], net.static_curvature)
    assert bool((feats[:, 7] == 0).all())  # no drift before the first step
    ids = _batch(0, vocab=300)
    opt.step(lambda: lm_loss(loaded.model, ids))
    assert bool(torch.isfinite(opt.last_sigma).all()) and float(opt.features()[:, 9][0]) > 0
    # learned-random with this artifact: a fresh net, the same spec and the artifact's measured curvature.
    rnd = build_optimizer("learned-random", loaded.model, artifact=str(path), lr=1e-3, eps=1e-3, seed=0, net_seed=7)
    assert rnd.net.spec == net.spec and torch.equal(rnd.net.static_curvature, net.static_curvature)


@pytest.mark.parametrize("model", ["tiny", "smollm2-135m"])
def test_each_shipped_artifact_is_the_recipe_of_its_meta_config(model: str) -> None:
    """meta_configs/<model>.yaml re-makes checkpoints/<model>/zo-finetuner: the recipe the artifact recorded is the
    config's (where it writes, how often it checkpoints and the data folder aside), role embedding included."""
    from l2zo.config import config_to_dict

    where = ("output", "logdir", "checkpoint_every", "histogram_every", "progress", "data_dir")
    shipped = REPO / "checkpoints" / model / "zo-finetuner"

    def recipe(file: Path) -> dict:
        flat: dict = {}
        for key, value in config_to_dict(build_config(MetaTrainConfig, file)).items():
            flat.update(value if isinstance(value, dict) and key in ("data", "dist", "adapter") else {key: value})
        return {k: v for k, v in flat.items() if k not in where}

    assert recipe(shipped / "meta_config.yaml") == recipe(REPO / "meta_configs" / f"{model}.yaml")
    net, _ = read_artifact(shipped)
    assert net.spec.role_embedding_dim == 4 and read_manifest(shipped)["net"]["features_version"] == 2
