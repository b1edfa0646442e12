"""The ``es`` meta-objective (l2zo.learned.es): the reward is a deterministic function of phi under common random
numbers, theta is restored bit for bit, the pair differences are finite differences of the reward (checked against
coordinate finite differences and against autograd through the unrolled objective), the estimate's mean is the
gradient of a known quadratic, Adam on the estimate raises the reward, and `l2zo meta-train --objective es` runs end
to end, resumes bit for bit and writes an artifact that `l2zo finetune --optimizer learned` loads.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from l2zo.engine import ZSource, mix_seed, partition
from l2zo.errors import L2ZOError
from l2zo.learned import NetSpec, VarianceNet, block_weights
from l2zo.learned.es import (
    ESConfig,
    StartState,
    antithetic_estimate,
    es_meta_loss,
    es_noise,
    get_phi,
    reward,
    set_phi_,
    space_params,
)
from l2zo.learned.meta import SigmaNorm, TaskState, unrolled_meta_loss
from l2zo.learned.meta_config import MetaTrainConfig
from tests.helpers import LinearModel, exact_weight_stats, lm_loss, tiny_llama

K = 3


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: at these sizes a forward is all fork-join overhead, and with the CPU shared it is 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _world(seed: int = 0, kind_scale: bool = False):
    """A tiny Llama, its net (hidden 8), K inner losses and a dev loss on other token batches."""
    model = tiny_llama(seed=seed)
    blocks = partition(model)
    net = VarianceNet(NetSpec(hidden=8, kind_scale=kind_scale), [b.name for b in blocks], seed=seed)
    norm = SigmaNorm(block_weights(blocks, "numel"))
    gen = torch.Generator().manual_seed(seed)
    inner_ids = [torch.randint(0, 97, (4, 12), generator=gen) for _ in range(K)]
    dev_ids = torch.randint(0, 97, (8, 12), generator=gen)
    inners = [lambda m, ids=ids: lm_loss(m, ids) for ids in inner_ids]
    return model, blocks, net, norm, inners, (lambda m: lm_loss(m, dev_ids))


def _start(model: nn.Module, blocks, dev) -> StartState:
    with torch.no_grad():
        return StartState([b.param.detach().clone() for b in blocks], TaskState(), float(dev(model)))


def test_reward_is_a_deterministic_function_of_phi_and_theta_is_restored_exactly() -> None:
    model, blocks, net, norm, inners, dev = _world()
    seeds = [mix_seed(3, k) for k in range(K)]
    before = [b.param.detach().clone() for b in blocks]
    start = _start(model, blocks, dev)
    twin = copy.deepcopy(net)
    kw = dict(eps=1e-3, lr=0.02, zsrc=ZSource())
    r1 = reward(model, blocks, twin, start, norm, inners, seeds, dev, **kw)
    r2 = reward(model, blocks, twin, start, norm, inners, seeds, dev, **kw)
    assert r1 == r2 and r1 != 0.0  # common random numbers: the same phi gives the same reward, bit for bit
    phi = get_phi(net, "all")
    set_phi_(twin, "all", phi + 0.05 * es_noise(1, 1, phi.numel())[0])
    assert reward(model, blocks, twin, start, norm, inners, seeds, dev, **kw) != r1

    cfg = ESConfig(pairs=2, sigma=0.01, space="all", eps=1e-3, lr=0.02)
    res = es_meta_loss(model, blocks, net, TaskState(), norm, inners, dev, seeds=seeds, cfg=cfg, zsrc=ZSource())
    for b, t in zip(blocks, before):
        assert torch.equal(b.param.detach(), t), b.name  # copied back, not perturbed back: no one-ulp drift
    assert float(res.meta_loss.detach()) == pytest.approx(-res.metrics["meta/es_reward"])
    assert res.metrics["meta/es_reward_spread"] > 0
    again = es_meta_loss(model, blocks, net, TaskState(), norm, inners, dev, seeds=seeds, cfg=cfg, zsrc=ZSource())
    assert again.metrics == res.metrics  # the directions too are a function of the seeds
    res.meta_loss.backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    flat = torch.cat([g.reshape(-1) for g in grads])
    assert float(flat.norm()) == pytest.approx(res.metrics["meta/es_grad_norm"], rel=1e-5)
    assert all(b.param.grad is None for b in blocks)  # only the net gets a gradient


def _linear_world(steps: int, rule: str, kind_scale: bool = False):
    model = LinearModel()
    blocks = partition(model)
    net = VarianceNet(NetSpec(hidden=8, kind_scale=kind_scale), [b.name for b in blocks], seed=1).double()
    if kind_scale:  # away from the zeros of init, so the table's gradient is not a special case
        net.kind_log_scale.data = torch.linspace(-0.5, 0.5, len(net.kinds), dtype=torch.float64)
    norm = SigmaNorm(block_weights(blocks, rule), rule)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64))
            for _ in range(steps + 1)]  # fmt: skip
    losses = [lambda m, x=x, y=y: ((m(x) - y) ** 2).mean() for x, y in data]
    return model, blocks, net, norm, losses[:steps], losses[steps]


@pytest.mark.parametrize("space", ["all", "bias", "kind"])
def test_pair_differences_are_finite_differences_of_the_reward(monkeypatch: pytest.MonkeyPatch, space: str) -> None:
    import l2zo.learned.meta as meta

    monkeypatch.setattr(meta, "weight_stats", exact_weight_stats)
    model, blocks, net, norm, inners, dev = _linear_world(K, "numel", kind_scale=space == "kind")
    # The engine reports every loss in fp32, so R is quantised at ~1e-7 even for this fp64 model: steps h = s = 1e-3
    # (truncation error ~1e-6) and eps = 0.1 (exact on a quadratic; g keeps more digits) bound the rounding at ~1e-4.
    seeds, s, h = [11, 12, 13], 1e-3, 1e-3
    start = _start(model, blocks, dev)
    twin = copy.deepcopy(net)

    def r(phi: torch.Tensor) -> float:
        set_phi_(twin, space, phi)
        return reward(model, blocks, twin, start, norm, inners, seeds, dev, eps=0.1, lr=0.05, zsrc=ZSource())

    phi = get_phi(net, space)
    eye = torch.eye(phi.numel(), dtype=phi.dtype)
    grad_fd = torch.tensor([(r(phi + h * e) - r(phi - h * e)) / (2 * h) for e in eye], dtype=phi.dtype)
    assert float(grad_fd.norm()) > 1e-3
    noise = es_noise(5, 4, phi.numel(), phi.dtype)
    est = antithetic_estimate(r, phi, noise, s)
    directional = (est.r_plus - est.r_minus) / (2 * s)  # [P]: what each pair measures
    torch.testing.assert_close(directional, noise @ grad_fd, rtol=2e-3, atol=5e-3)
    torch.testing.assert_close(est.grad, noise.T @ directional / len(noise), rtol=1e-12, atol=1e-15)


def test_one_step_reward_gradient_matches_autograd_through_the_unrolled_objective(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With K = 1 and no normalisation (c = 1) nothing the unrolled objective detaches depends on phi, so its
    # autograd gradient (through sigma and g) is the exact gradient of -R: an independent, out-of-place reference.
    import l2zo.learned.meta as meta

    monkeypatch.setattr(meta, "weight_stats", exact_weight_stats)
    model, blocks, net, norm, inners, dev = _linear_world(1, "none")
    start = _start(model, blocks, dev)
    res = unrolled_meta_loss(model, blocks, net, TaskState(), norm, inners, dev, seeds=[21], eps=0.1, lr=0.05,
                             zsrc=ZSource(), differentiable_g=True)  # fmt: skip
    res.meta_loss.backward()
    grad_r = -torch.cat([p.grad.reshape(-1) for _, p in space_params(net, "all")])
    twin = copy.deepcopy(net)

    def r(phi: torch.Tensor) -> float:
        set_phi_(twin, "all", phi)
        return reward(model, blocks, twin, start, norm, inners, [21], dev, eps=0.1, lr=0.05, zsrc=ZSource())

    phi = get_phi(net, "all")
    noise = es_noise(7, 3, phi.numel(), phi.dtype)
    est = antithetic_estimate(r, phi, noise, 1e-3)  # fp32 losses: see the test above for the step sizes
    assert float(grad_r.norm()) > 1e-2
    torch.testing.assert_close((est.r_plus - est.r_minus) / 2e-3, noise @ grad_r, rtol=2e-3, atol=2e-3)


def test_estimate_is_unbiased_on_a_known_quadratic() -> None:
    # R(phi) = -1/2 (phi - a)^T A (phi - a): the antithetic difference is exactly 2 s e^T grad R (the quadratic term
    # cancels), and the mean over P Gaussian directions has relative rms error sqrt((d + 1) / P) = 0.042 here.
    d, pairs, s = 6, 4000, 0.1
    g = torch.Generator().manual_seed(0)
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    a_mat = m @ m.T + torch.eye(d, dtype=torch.float64)
    a = torch.randn(d, generator=g, dtype=torch.float64)
    phi = torch.randn(d, generator=g, dtype=torch.float64)

    def r(x: torch.Tensor) -> float:
        return float(-0.5 * (x - a) @ a_mat @ (x - a))

    true = -a_mat @ (phi - a)
    noise = es_noise(3, pairs, d, torch.float64)
    est = antithetic_estimate(r, phi, noise, s)
    torch.testing.assert_close(est.r_plus - est.r_minus, 2 * s * noise @ true, rtol=1e-9, atol=1e-9)
    assert float((est.grad - true).norm() / true.norm()) < 0.15


def _adam_on_es(kind_scale: bool, cfg: ESConfig, meta_lr: float) -> tuple[float, float, dict, VarianceNet]:
    """Six ES meta-steps (Adam) on four fixed (batches, z seeds) draws of ``_world(1)``: the mean reward over those
    draws before and after, the net's initial state and the net. Checks that only the searched space gets a grad."""
    model, blocks, net, norm, inners, dev = _world(seed=1, kind_scale=kind_scale)
    init = copy.deepcopy(net.state_dict())
    draws = [[mix_seed(t, k) for k in range(K)] for t in range(4)]
    start = _start(model, blocks, dev)
    searched = {name for name, _ in space_params(net, cfg.space)}

    def mean_reward() -> float:
        return sum(reward(model, blocks, net, start, norm, inners, seeds, dev, eps=1e-3, lr=0.05, zsrc=ZSource())
                   for seeds in draws) / len(draws)  # fmt: skip

    opt = torch.optim.Adam(net.parameters(), lr=meta_lr)
    before = mean_reward()
    for step in range(6):
        opt.zero_grad()
        res = es_meta_loss(model, blocks, net, TaskState(), norm, inners, dev, seeds=draws[step % 4], cfg=cfg,
                           zsrc=ZSource())  # fmt: skip
        res.meta_loss.backward()
        assert all(p.grad is None for name, p in net.named_parameters() if name not in searched)
        opt.step()
    return before, mean_reward(), init, net


def test_adam_on_the_es_estimate_raises_the_reward_at_a_fixed_start() -> None:
    # At inner lr 0.05 the untrained net's K-step runs raise the dev loss (R < 0); six ES meta-steps (Adam) on four
    # fixed (batches, z seeds) draws raise the mean reward over those draws.
    cfg = ESConfig(pairs=2, sigma=0.05, eps=1e-3, lr=0.05)  # the default space: b2, one scalar per block
    before, after, _, _ = _adam_on_es(False, cfg, meta_lr=0.05)
    assert after > before + 0.05  # measured: -0.221 -> -0.128


def test_adam_on_the_kind_table_raises_the_reward_and_moves_nothing_else() -> None:
    # The same world with the per-kind log-scale searched instead (d = the 11 kinds of the tiny Llama): only the
    # table moves, the MLPs stay the untrained net's.
    cfg = ESConfig(pairs=2, sigma=0.2, space="kind", eps=1e-3, lr=0.05)
    before, after, init, net = _adam_on_es(True, cfg, meta_lr=0.1)
    assert after > before + 0.02, (before, after)  # measured: -0.221 -> -0.048 (b2's six steps: -0.128)
    for name, value in net.state_dict().items():
        assert torch.equal(value, init[name]) != (name == "kind_log_scale"), name


def test_es_config_checks() -> None:
    with pytest.raises(L2ZOError, match="--outer-batch heldout"):
        MetaTrainConfig(objective="es")
    with pytest.raises(L2ZOError, match="--es-pairs must be positive"):
        MetaTrainConfig(objective="es", outer_batch="heldout", es_pairs=0)
    cfg = MetaTrainConfig(objective="es", outer_batch="heldout", unroll_steps=20, es_space="bias", es_starts="both")
    assert cfg.objective_name == "es-K20-P8-s0.01-bias-both-heldout"
    with pytest.raises(L2ZOError, match="unknown ES space"):
        ESConfig(pairs=1, sigma=0.1, space="nope")
    with pytest.raises(L2ZOError, match="add --kind-scale"):
        MetaTrainConfig(objective="es", outer_batch="heldout", es_space="kind")
    kind = MetaTrainConfig(objective="es", outer_batch="heldout", es_space="kind", kind_scale=True)
    assert kind.objective_name == "es-K1-P8-s0.01-kind-heldout"
    net = VarianceNet(NetSpec(hidden=4), ["a.weight", "b.weight"])
    with pytest.raises(L2ZOError, match="build it with kind_scale"):
        get_phi(net, "kind")


# ------------------------------------------------------------------------------------ the CLI, end to end


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("es_model")
    tiny_llama(vocab=300).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


def _argv(model_dir: Path, tmp: Path, name: str, steps: int) -> list[str]:
    return ["meta-train", "--model", str(model_dir), "--tasks", "synth-sentiment,synth-parity", "--num-train", "24",
            "--num-dev", "8", "--batch-size", "4", "--max-length", "40", "--steps", str(steps), "--reset-every", "3",
            "--checkpoint-every", "2", "--p-teacher", "0.5", "--objective", "es", "--outer-batch", "heldout",
            "--unroll-steps", "2", "--es-pairs", "2", "--es-starts", "both", "--inner-lr", "0.01", "--no-progress",
            "--output", str(tmp / name / "artifact"), "--logdir", str(tmp / name / "run")]  # fmt: skip


def test_meta_train_es_resumes_exactly_and_finetune_loads_the_artifact(model_dir: Path, tmp_path: Path) -> None:
    from l2zo.cli.main import main
    from l2zo.learned.artifact import read_artifact

    n = 2
    assert main(_argv(model_dir, tmp_path, "full", 2 * n)) == 0
    assert main(_argv(model_dir, tmp_path, "resumed", n)) == 0  # the "kill": its last.ckpt is at step n
    ckpt = tmp_path / "resumed" / "run" / "checkpoints" / "last.ckpt"
    assert main([*_argv(model_dir, tmp_path, "resumed", 2 * n), "--resume", str(ckpt), "--overwrite"]) == 0

    net_a, manifest = read_artifact(str(tmp_path / "full" / "artifact"))
    net_b, _ = read_artifact(str(tmp_path / "resumed" / "artifact"))
    assert manifest["meta_training"]["steps"] == 2 * n
    assert "es-K2-P2" in json.dumps(manifest)
    for (k, a), b in zip(net_a.state_dict().items(), net_b.state_dict().values()):
        assert torch.equal(a, b), k
    ca, cb = (torch.load(tmp_path / name / "run" / "checkpoints" / "last.ckpt", map_location="cpu",
                         weights_only=False) for name in ("full", "resumed"))  # fmt: skip
    assert ca["global_step"] == cb["global_step"] == 2 * n
    for k, v in ca["state_dict"].items():
        assert torch.equal(v, cb["state_dict"][k]), k  # theta and the net
    assert ca["l2zo_meta"]["history"] == cb["l2zo_meta"]["history"]
    assert net_a.state_dict()["b2"].ne(VarianceNet(net_a.spec, net_a.block_names).state_dict()["b2"]).any()

    rc = main(["finetune", "--model", str(model_dir), "--task", "synth-sentiment", "--steps", "2", "--num-train", "16",
               "--num-dev", "8", "--num-test", "8", "--batch-size", "4", "--max-length", "40", "--no-progress",
               "--optimizer", "learned", "--artifact", str(tmp_path / "full" / "artifact"),
               "--logdir", str(tmp_path / "ft")])  # fmt: skip
    assert rc == 0
