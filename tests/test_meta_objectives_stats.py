"""The ``expected`` and ``distill`` meta-objectives (l2zo.blockstats.expected / distill / state_stats).

- The statistics measured at a state from meta-training's loss closures (``measure_state``) against their exact
  values on an explicit quadratic with minibatch noise (tolerance: 4 standard errors, measured from the samples,
  and the standard error itself small against the value, so a pass is informative).
- The closed-form K-step expected loss against a Monte-Carlo average of real ZO steps on that quadratic.
- For both objectives: the meta-gradient w.r.t. the net's parameters against central finite differences
  (fp64 net and model), and a few Adam meta-steps lowering the meta-loss at a fixed state of a tiny Llama.
- distill: 0 at the target; the net's allocation moves toward the oracle's.
- End to end: ``l2zo meta-train --objective expected|distill`` writes an artifact ``l2zo finetune --optimizer
  learned`` loads; an ``expected`` run resumed from its checkpoint ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from l2zo.blockstats import BlockStats, gsl
from l2zo.blockstats.distill import OracleSpec, distill_loss, distill_meta_loss, distill_target, oracle_allocation
from l2zo.blockstats.expected import expected_loss, expected_meta_loss, in_graph_sigma
from l2zo.blockstats.state_stats import StatsSpec, batch_fns, measure_state, stats_draws
from l2zo.engine import ZSource, partition
from l2zo.errors import L2ZOError
from l2zo.learned import NetSpec, VarianceNet, block_weights
from l2zo.learned.meta import SigmaNorm, TaskState, predict_sigma
from l2zo.learned.meta_config import MetaTrainConfig
from tests.helpers import LinearModel, exact_weight_stats, lm_loss, tiny_llama

SIZES = (2, 3, 5)  # numel per block of the quadratic
CURV = (0.5, 2.0, 1.0)  # l_b: H_bb = l_b I
NOISE_SD = (0.8, 0.3, 0.5)  # per-example label spread per block


class NoisyQuadratic(nn.Module):
    """L(x) = E_c [ sum_b 0.5 l_b ||x_b - c_b||^2 ], c ~ N(0, sd_b^2 I) per example (an infinite population).

    Per block, exactly: gradient l_b x_b, G_b = l_b^2 ||x_b||^2; minibatch noise tr(C_b) = n_b l_b^2 sd_b^2 / B;
    H_bb = l_b I, tau_b = n_b l_b; E[g^T H g] = l_b (G_b + tr C_b). The loss is the negative log-likelihood of
    c ~ N(x, I / l_b), so labels drawn from the model (c ~ N(x, I / l_b)) give the Fisher, equal to H.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.x = nn.ParameterList([nn.Parameter(torch.randn(k, generator=g, dtype=torch.float64)) for k in SIZES])
        self.l = [torch.full((k,), v, dtype=torch.float64) for k, v in zip(SIZES, CURV)]
        self.sd = [torch.full((k,), v, dtype=torch.float64) for k, v in zip(SIZES, NOISE_SD)]

    def draw(self, gen: torch.Generator, batch: int) -> list[torch.Tensor]:
        """One minibatch: c [batch, n_b] per block."""
        return [torch.randn(batch, k, generator=gen, dtype=torch.float64) * sd for k, sd in zip(SIZES, self.sd)]

    @staticmethod
    def loss_of(model: nn.Module, c: list[torch.Tensor]) -> torch.Tensor:
        return sum(0.5 * (l * (x - cb) ** 2).sum(-1).mean() for x, l, cb in zip(model.x, model.l, c))  # type: ignore[return-value]

    def batch(self, gen: torch.Generator, batch: int):
        c = self.draw(gen, batch)

        def sampled(model: nn.Module, g: torch.Generator) -> torch.Tensor:
            with torch.no_grad():
                labels = [x + torch.randn(batch, x.numel(), generator=g, dtype=torch.float64) / l.sqrt()
                          for x, l in zip(model.x, model.l)]  # fmt: skip
            return self.loss_of(model, labels)

        return batch_fns(self, lambda model: self.loss_of(model, c), batch, sampled)

    def exact(self, batch: int) -> dict[str, torch.Tensor]:
        n = torch.tensor(SIZES, dtype=torch.float64)
        l, sd = torch.tensor(CURV, dtype=torch.float64), torch.tensor(NOISE_SD, dtype=torch.float64)
        sq = torch.stack([(x.detach() ** 2).sum() for x in self.x])
        G = l * l * sq
        noise = n * l * l * sd * sd / batch
        return {"G": G, "noise": noise, "tau": n * l, "gHg": l * (G + noise), "n": n, "l": l}


def _mean_se(values: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack(values)
    return x.mean(0), x.std(0) / math.sqrt(x.shape[0])


@pytest.mark.parametrize("curvature", ["hessian", "fisher"])
def test_state_statistics_match_the_exact_values_of_a_noisy_quadratic(curvature: str) -> None:
    prob = NoisyQuadratic()
    blocks = partition(prob)
    gen, batch = torch.Generator().manual_seed(1), 4
    spec = StatsSpec(probes=1, gHg_probes=1, fisher_samples=1, curvature=curvature)
    samples = [measure_state(prob, blocks, prob.batch(gen, batch), prob.batch(gen, batch), spec, seed=k)
               for k in range(1000)]  # fmt: skip
    exact = prob.exact(batch)
    for key, rel_se in (("G", 0.1), ("noise", 0.1), ("tau", 0.1), ("gHg", 0.15)):
        est, se = _mean_se([getattr(s, key) for s in samples])
        assert torch.all(se < rel_se * exact[key]), f"{key}: too noisy to test, se {se} vs {exact[key]}"
        assert torch.all((est - exact[key]).abs() <= 4 * se), f"{key}: {est} +- {se} vs exact {exact[key]}"
    # One pair per state: standard errors are undefined; the parameters did not move.
    assert bool(torch.isnan(samples[0].G_se).all()) and samples[0].pairs == 1
    assert torch.equal(torch.cat(list(prob.x)), torch.cat(list(NoisyQuadratic().x)))


def test_fisher_curvature_without_sampled_labels_is_a_one_line_error() -> None:
    prob = NoisyQuadratic()
    gen = torch.Generator().manual_seed(0)
    c1, c2 = prob.draw(gen, 4), prob.draw(gen, 4)
    a = batch_fns(prob, lambda m: prob.loss_of(m, c1), 4)
    b = batch_fns(prob, lambda m: prob.loss_of(m, c2), 4)
    with pytest.raises(L2ZOError, match="no Fisher statistics"):
        measure_state(prob, partition(prob), a, b, StatsSpec(curvature="fisher"), seed=0)
    # "auto" falls back to the Hessian
    stats = measure_state(prob, partition(prob), a, b, StatsSpec(curvature="auto"), seed=0)
    assert not stats.has_fisher and bool(torch.isfinite(stats.tau).all())


def _exact_stats(prob: NoisyQuadratic, batch: int) -> BlockStats:
    e = prob.exact(batch)
    nan = torch.full_like(e["G"], math.nan)
    return BlockStats(
        names=("x.0", "x.1", "x.2"), kinds=("w",) * 3, n=e["n"], G=e["G"], noise=e["noise"], tau=e["tau"],
        gHg=e["gHg"], G_se=nan, noise_se=nan, tau_se=nan, gHg_se=nan, fisher=e["tau"], gFg=e["gHg"],
        fisher_se=nan, gFg_se=nan, loss=0.0, pairs=1, probes=1,
    )  # fmt: skip


def _zo_run(prob: NoisyQuadratic, s_block: torch.Tensor, eta: float, steps: int, runs: int, batch: int) -> torch.Tensor:
    """Mean excess loss L(x_K) - L* over ``runs`` real ZO runs: u = S z, the two-point projected gradient on a
    fresh minibatch (exact for a quadratic: u^T g_t), x <- x - eta (u^T g_t) u. [runs] excess losses."""
    g = torch.Generator().manual_seed(3)
    x = torch.cat([p.detach() for p in prob.x]).expand(runs, -1).clone()
    l = torch.cat(prob.l)
    sd = torch.cat(prob.sd)
    s = torch.repeat_interleave(s_block, torch.tensor(SIZES))
    eps = 1e-3
    for _ in range(steps):
        c = torch.randn(runs, batch, x.shape[1], generator=g, dtype=torch.float64) * sd

        def batch_loss(y: torch.Tensor, c: torch.Tensor = c) -> torch.Tensor:
            return 0.5 * (l * (y.unsqueeze(1) - c) ** 2).sum(-1).mean(1)

        u = torch.randn(runs, x.shape[1], generator=g, dtype=torch.float64) * s
        proj = (batch_loss(x + eps * u) - batch_loss(x - eps * u)) / (2 * eps)
        x = x - eta * proj.unsqueeze(1) * u
    return 0.5 * (l * x * x).sum(1)


def test_kstep_expected_loss_matches_real_zo_steps_on_the_quadratic() -> None:
    prob, batch, steps = NoisyQuadratic(), 4, 12
    stats = _exact_stats(prob, batch)
    s = in_graph_sigma(torch.tensor([1.3, 0.6, 1.0], dtype=torch.float64), SigmaNorm(stats.n))
    f0 = float(prob.exact(batch)["G"].div(2 * torch.tensor(CURV, dtype=torch.float64)).sum())
    wf = OracleSpec(oracle="water-filling", wf_eta=0.05)
    s_wf = oracle_allocation(stats, wf)
    assert s_wf is not None and float((stats.n * s_wf * s_wf).sum()) == pytest.approx(float(stats.n.sum()))
    for eta in (0.05, None):
        out = expected_loss(s, stats, horizon=steps, eta=eta)
        assert out.f0 == pytest.approx(f0, rel=1e-9)  # the model puts the whole excess loss where it is
        sim = _zo_run(prob, s, out.eta, steps, runs=40_000, batch=batch) / f0
        mean, se = float(sim.mean()), float(sim.std() / math.sqrt(sim.numel()))
        assert se < 0.02 * mean
        assert abs(mean - float(out.loss)) < 4 * se, (eta, mean, se, float(out.loss))
    # The tuned eta does at least as well as the fixed one, and the loss ratio is scale-free in s.
    tuned = expected_loss(s, stats, horizon=steps)
    assert float(tuned.loss) <= float(expected_loss(s, stats, horizon=steps, eta=0.05).loss)
    assert float(expected_loss(3 * s, stats, horizon=steps).loss) == pytest.approx(float(tuned.loss), rel=1e-6)


# ------------------------------------------------------------------------- meta-gradients vs finite differences


def _linear_state(monkeypatch: pytest.MonkeyPatch):
    import l2zo.learned.meta as meta

    monkeypatch.setattr(meta, "weight_stats", exact_weight_stats)  # the fast weight_stats takes fp32/bf16
    model = LinearModel()
    blocks = partition(model)
    net = VarianceNet(NetSpec(hidden=8), [b.name for b in blocks], seed=1).double()
    norm = SigmaNorm(block_weights(blocks, "numel"))
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64))
            for _ in range(2)]  # fmt: skip
    losses = [lambda m, x=x, y=y: ((m(x) - y) ** 2).mean() for x, y in data]
    stats = measure_state(model, blocks, batch_fns(model, losses[0], 8), batch_fns(model, losses[1], 8),
                          StatsSpec(probes=4, gHg_probes=2), seed=0)  # fmt: skip
    assert bool((stats.G > 0).all()) and bool((stats.tau > 0).all())  # a state with signal in both blocks
    return model, blocks, net, norm, losses[0], stats


def _check_fd(net: VarianceNet, objective) -> None:  # type: ignore[no-untyped-def]
    h = 1e-6
    for name, index in (("b2", (0,)), ("b2", (1,)), ("w2", (1, 3)), ("w1", (0, 2, 5)), ("b1", (1, 4))):
        param = getattr(net, name)
        with torch.no_grad():
            param[index] += h
            up = objective()
            param[index] -= 2 * h
            down = objective()
            param[index] += h
        fd = (up - down) / (2 * h)
        assert param.grad[index].item() == pytest.approx(fd, rel=1e-5, abs=1e-11), (name, index)


def test_expected_meta_gradient_matches_finite_differences(monkeypatch: pytest.MonkeyPatch) -> None:
    model, blocks, net, norm, loss, stats = _linear_state(monkeypatch)
    state, horizon = TaskState(), 20
    res, out = expected_meta_loss(model, blocks, net, state, norm, loss, stats, seed=5, eps=1e-3, zsrc=ZSource(),
                                  horizon=horizon)  # fmt: skip
    res.meta_loss.backward()
    assert 0 < float(res.meta_loss.detach()) < 1 and math.isfinite(out.eta)
    assert sum(float(p.grad.abs().sum()) for p in net.parameters()) > 0
    assert all(b.param.grad is None for b in blocks)  # the statistics and the probe leave no .grad behind

    def at(eta: float | None) -> float:
        with torch.no_grad():
            raw = predict_sigma(net, blocks, state, norm).raw
            return float(expected_loss(in_graph_sigma(raw, norm), stats, horizon=horizon, eta=eta).loss)

    _check_fd(net, lambda: at(out.eta))  # the tuned eta is a constant of the step
    # Envelope: re-tuning eta at every evaluation gives the same derivative (eta is at its optimum).
    h, param = 1e-5, net.b2
    with torch.no_grad():
        param[0] += h
        up = at(None)
        param[0] -= 2 * h
        down = at(None)
        param[0] += h
    assert param.grad[0].item() == pytest.approx((up - down) / (2 * h), rel=1e-3)


def test_expected_at_a_fixed_eta_keeps_the_normalisation_in_the_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    model, blocks, net, norm, loss, stats = _linear_state(monkeypatch)
    state = TaskState()
    res, out = expected_meta_loss(model, blocks, net, state, norm, loss, stats, seed=5, eps=1e-3, zsrc=ZSource(),
                                  horizon=10, eta=0.01)  # fmt: skip
    res.meta_loss.backward()
    assert out.eta == 0.01

    def objective() -> float:
        with torch.no_grad():
            raw = predict_sigma(net, blocks, state, norm).raw
            return float(expected_loss(in_graph_sigma(raw, norm), stats, horizon=10, eta=0.01).loss)

    _check_fd(net, objective)
    # Scaling the net's output changes nothing: c is differentiated through, so the gradient has no radial part.
    raw = predict_sigma(net, blocks, state, norm).raw.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(expected_loss(in_graph_sigma(raw, norm), stats, horizon=10, eta=0.01).loss, raw)
    assert abs(float(grad @ raw.detach().to(grad))) < 1e-12 * float(grad.norm() * raw.norm()) + 1e-15


def test_distill_meta_gradient_matches_finite_differences(monkeypatch: pytest.MonkeyPatch) -> None:
    model, blocks, net, norm, loss, stats = _linear_state(monkeypatch)
    state, oracle = TaskState(), OracleSpec()
    res, target = distill_meta_loss(model, blocks, net, state, norm, loss, stats, seed=5, eps=1e-3, zsrc=ZSource(),
                                    oracle=oracle)  # fmt: skip
    assert target is not None
    res.meta_loss.backward()
    assert float(res.meta_loss) > 0

    def objective() -> float:
        with torch.no_grad():
            return float(distill_loss(predict_sigma(net, blocks, state, norm).raw, target, norm))

    _check_fd(net, objective)


# ------------------------------------------------------------------------------------ distill: the target


def test_distill_loss_is_zero_at_the_target_and_the_target_is_the_oracle() -> None:
    model = tiny_llama(seed=0)
    blocks = partition(model)
    norm = SigmaNorm(block_weights(blocks, "numel"))
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, 97, (4, 12), generator=gen) for _ in range(2))
    stats = measure_state(model, blocks, batch_fns(model, lambda m: lm_loss(m, a), 4),
                          batch_fns(model, lambda m: lm_loss(m, b), 4), StatsSpec(), seed=0)  # fmt: skip
    spec = OracleSpec()
    s_star = oracle_allocation(stats, spec)
    assert s_star is not None
    torch.testing.assert_close(s_star, gsl(stats, 0.5))  # the default: GS-L at temperature 1/2
    target = distill_target(s_star, norm, spec.floor)
    # Normalised like the optimizer's sigma, floored where GS-L gives a block (almost) nothing.
    assert float((norm.n * target * target).sum()) == pytest.approx(float(norm.n.sum()), rel=1e-12)
    assert float(target.min()) >= spec.floor * 0.5
    # 0 at the target, whatever the net's overall scale; positive elsewhere.
    assert float(distill_loss(7.3 * target, target, norm)) < 1e-24
    other = target * torch.linspace(0.5, 2.0, len(blocks), dtype=torch.float64)
    assert float(distill_loss(other, target, norm)) > 1e-3
    for name in ("hizoo",):
        alt = oracle_allocation(stats, OracleSpec(oracle=name))
        assert alt is not None and float((stats.n * alt * alt).sum()) == pytest.approx(float(stats.n.sum()))
    # No block with G_b > 0: no target, no signal.
    flat = dataclasses.replace(stats, G=-stats.G.abs())
    assert oracle_allocation(flat, spec) is None
    with pytest.raises(L2ZOError, match="bad distill oracle"):
        OracleSpec(oracle="nope")


# ------------------------------------------------------------------------ a few meta-steps at a fixed state


def _llama_state():
    model = tiny_llama(seed=1)
    blocks = partition(model)
    net = VarianceNet(NetSpec(), [b.name for b in blocks], seed=1)
    norm = SigmaNorm(block_weights(blocks, "numel"))
    gen = torch.Generator().manual_seed(1)
    a, b = (torch.randint(0, 97, (8, 12), generator=gen) for _ in range(2))
    loss_a = lambda m: lm_loss(m, a)  # noqa: E731
    stats = measure_state(model, blocks, batch_fns(model, loss_a, 8), batch_fns(model, lambda m: lm_loss(m, b), 8),
                          StatsSpec(probes=4, gHg_probes=2), seed=1)  # fmt: skip
    return model, blocks, net, norm, loss_a, stats


def test_adam_meta_steps_lower_the_expected_meta_loss() -> None:
    model, blocks, net, norm, loss, stats = _llama_state()

    def meta() -> torch.Tensor:
        return expected_meta_loss(model, blocks, net, TaskState(), norm, loss, stats, seed=3, eps=1e-3,
                                  zsrc=ZSource(), horizon=50)[0].meta_loss  # fmt: skip

    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    before = float(meta())
    for _ in range(10):
        opt.zero_grad()
        meta().backward()
        opt.step()
    after = float(meta())
    assert after < before - 0.01 * (1 - before), (before, after)


def test_adam_meta_steps_move_the_allocation_toward_the_oracle() -> None:
    model, blocks, net, norm, loss, stats = _llama_state()
    oracle = OracleSpec()

    def meta() -> tuple[torch.Tensor, torch.Tensor]:
        res, target = distill_meta_loss(model, blocks, net, TaskState(), norm, loss, stats, seed=3, eps=1e-3,
                                        zsrc=ZSource(), oracle=oracle)  # fmt: skip
        assert target is not None
        return res.meta_loss, target

    def corr(x: torch.Tensor, y: torch.Tensor) -> float:
        x, y = x - x.mean(), y - y.mean()
        return float(x @ y / (x.norm() * y.norm()))

    with torch.no_grad():
        before, target = meta()
        s0 = in_graph_sigma(predict_sigma(net, blocks, TaskState(), norm).raw, norm)
    opt = torch.optim.Adam(net.parameters(), lr=0.03)
    for _ in range(20):
        opt.zero_grad()
        meta()[0].backward()
        opt.step()
    with torch.no_grad():
        after, _ = meta()
        s1 = in_graph_sigma(predict_sigma(net, blocks, TaskState(), norm).raw, norm)
    assert float(after) < 0.6 * float(before), (float(before), float(after))
    assert corr(s1.log(), target.log()) > corr(s0.log(), target.log()) + 0.2


# ------------------------------------------------------------------------------------------ plan and config


def test_stats_draws_are_a_pure_function_of_seed_and_step() -> None:
    a, b = stats_draws(0, 7, 30, 4), stats_draws(0, 7, 30, 4)
    assert a == b and len(set(a.second)) == 4 and all(0 <= i < 30 for i in a.second)
    assert stats_draws(0, 8, 30, 4) != a and stats_draws(1, 7, 30, 4) != a


def test_config_labels_and_refusals() -> None:
    from l2zo.config.parser import build_config

    assert build_config(MetaTrainConfig, overrides={"objective": "expected"}).objective_name == \
        "expected-K300-tuned-auto"  # fmt: skip
    cfg = build_config(MetaTrainConfig, overrides={"objective": "distill", "distill_oracle": "hizoo",
                                                   "distill_gamma": 0.5, "stats_curvature": "hessian"})  # fmt: skip
    assert cfg.objective_name == "distill-hizoo-g0.5-hessian"
    assert build_config(MetaTrainConfig, overrides={}).objective_name == "greedy"  # unchanged
    with pytest.raises(L2ZOError, match="do not apply to --objective expected"):
        build_config(MetaTrainConfig, overrides={"objective": "expected", "outer_batch": "heldout"})
    with pytest.raises(L2ZOError, match="expected-horizon must be positive"):
        build_config(MetaTrainConfig, overrides={"objective": "expected", "expected_horizon": 0})


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("objstats_model")
    tiny_llama(vocab=300).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


def _meta_argv(model_dir: Path, tmp: Path, name: str, objective: str, steps: int) -> list[str]:
    return ["meta-train", "--model", str(model_dir), "--tasks", "synth-sentiment,synth-parity", "--num-train", "24",
            "--num-dev", "8", "--batch-size", "4", "--max-length", "40", "--no-progress", "--objective", objective,
            "--steps", str(steps), "--reset-every", "3", "--p-teacher", "0.5", "--checkpoint-every", "2",
            "--expected-horizon", "50", "--logdir", str(tmp / name / "run"), "--output", str(tmp / name / "art")]  # fmt: skip


@pytest.mark.parametrize("objective", ["expected", "distill"])
def test_meta_train_writes_an_artifact_that_finetune_loads(objective: str, model_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    import json

    from l2zo.cli.main import main
    from l2zo.learned.artifact import read_artifact

    assert main(_meta_argv(model_dir, tmp_path, "m", objective, 3)) == 0, capsys.readouterr().err
    art = tmp_path / "m" / "art"
    _, manifest = read_artifact(art)
    assert manifest["meta_training"]["objective"].startswith(objective)
    history = json.loads((tmp_path / "m" / "run" / "summary.json").read_text())["meta_loss_history"]
    assert len(history) == 3 and all(math.isfinite(v) for _, _, v in history)
    logdir = tmp_path / "ft"
    rc = main(["finetune", "--model", str(model_dir), "--task", "synth-sentiment", "--optimizer", "learned",
               "--opt-args", f"artifact={art}", "--steps", "2", "--eval-every", "2", "--num-train", "16",
               "--num-dev", "8", "--num-test", "8", "--batch-size", "4", "--max-length", "40", "--no-progress",
               "--logdir", str(logdir)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert json.loads((logdir / "summary.json").read_text())["optimizer"] == "learned"


def test_expected_meta_training_resumes_exactly(model_dir: Path, tmp_path: Path) -> None:
    from l2zo.cli.main import main

    assert main(_meta_argv(model_dir, tmp_path, "full", "expected", 4)) == 0
    assert main(_meta_argv(model_dir, tmp_path, "res", "expected", 2)) == 0  # the "kill" after 2 steps
    ckpt = tmp_path / "res" / "run" / "checkpoints" / "last.ckpt"
    assert main([*_meta_argv(model_dir, tmp_path, "res", "expected", 4), "--resume", str(ckpt), "--overwrite"]) == 0
    a = torch.load(tmp_path / "full" / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 4
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k  # theta and the net
    assert a["l2zo_meta"]["history"] == b["l2zo_meta"]["history"]
