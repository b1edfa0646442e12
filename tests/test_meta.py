"""Meta-training: meta-gradients (finite, non-zero, equal to finite differences), descent, the unrolled
objective, on-policy steps, periodic reset and exact resume from a Lightning checkpoint.

Models are built from configs (tests.helpers.tiny_llama, eager attention); nothing is downloaded.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from l2zo.config.parser import build_config
from l2zo.engine import ZSource, mix_seed, partition
from l2zo.learned import NetSpec, VarianceNet, block_weights
from l2zo.learned.meta import (
    FunctionalModel,
    SigmaNorm,
    TaskState,
    greedy_meta_loss,
    lookahead_params,
    plan_step,
    predict_sigma,
    unrolled_meta_loss,
)
from l2zo.learned.meta_config import MetaTrainConfig
from l2zo.learned.trajectory import PretrainedCopy, make_teacher, on_policy_step, teacher_lr, teacher_step
from l2zo.optim.methods.learned import LearnedZO
from tests.helpers import LinearModel, exact_weight_stats, lm_loss, tiny_llama

REPO = Path(__file__).resolve().parents[1]


def _setup(seed: int = 0, tie: bool = True):
    model = tiny_llama(tie=tie, seed=seed)
    blocks = partition(model)
    net = VarianceNet(NetSpec(), [b.name for b in blocks], seed=seed)
    norm = SigmaNorm(block_weights(blocks, "numel"))
    ids = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(seed))
    return model, blocks, net, norm, (lambda m: lm_loss(m, ids))


def test_greedy_meta_gradient_finite_nonzero_and_theta_untouched() -> None:
    model, blocks, net, norm, loss = _setup()
    before = [b.param.detach().clone() for b in blocks]
    res = greedy_meta_loss(model, blocks, net, TaskState(), norm, loss, loss, seed=7, eps=1e-3, lr=1e-2, zsrc=ZSource())
    res.meta_loss.backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # Only the net gets gradients; theta is back within the engine's one-ulp probe round trip.
    assert all(b.param.grad is None for b in blocks)
    for b, t in zip(blocks, before):
        torch.testing.assert_close(b.param.detach(), t, rtol=0, atol=1e-6)


def test_meta_gradient_matches_finite_differences(monkeypatch: pytest.MonkeyPatch) -> None:
    import l2zo.learned.meta as meta

    monkeypatch.setattr(meta, "weight_stats", exact_weight_stats)  # the fast weight_stats takes fp32/bf16 weights
    model = LinearModel()
    blocks = partition(model)
    net = VarianceNet(NetSpec(hidden=8), [b.name for b in blocks], seed=1).double()
    norm = SigmaNorm(block_weights(blocks, "numel"))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
    loss = lambda m: ((m(x) - y) ** 2).mean()  # noqa: E731
    state, zsrc, seed, lr = TaskState(), ZSource(), 5, 0.1
    res = greedy_meta_loss(model, blocks, net, state, norm, loss, loss, seed=seed, eps=1e-3, lr=lr, zsrc=zsrc)
    res.meta_loss.backward()
    g0, c0 = res.probe.projected_grad, res.sigma.c  # constants of the objective (detached, as the paper)

    def objective() -> float:
        with torch.no_grad():
            raw = predict_sigma(net, blocks, state, norm).raw
            params = lookahead_params(blocks, [b.param for b in blocks], lr * g0 * c0 * raw, seed, zsrc)
            return float(loss(FunctionalModel(model, params)))

    h = 1e-6
    for name, index in (("b2", (0,)), ("b2", (1,)), ("w2", (1, 3)), ("w1", (0, 2, 5))):
        param = getattr(net, name)
        with torch.no_grad():
            param[index] += h
            up = objective()
            param[index] -= 2 * h
            down = objective()
            param[index] += h
        fd = (up - down) / (2 * h)
        assert param.grad[index].item() == pytest.approx(fd, rel=1e-5, abs=1e-10), name


def test_twenty_meta_steps_lower_the_meta_loss() -> None:
    # A fixed meta-training set: two tasks (token batches) x two z seeds, at a fixed theta. Single meta-steps
    # are noisy draws, so descent is checked on the objective the meta-optimizer is given.
    model, blocks, net, norm, _ = _setup(seed=1)
    gen = torch.Generator().manual_seed(1)
    family = [torch.randint(0, 97, (4, 12), generator=gen) for _ in range(2)]
    pairs = [(task, seed) for task in range(2) for seed in (11, 12)]
    zsrc = ZSource()

    def meta(task: int, seed: int) -> torch.Tensor:
        loss = lambda m: lm_loss(m, family[task])  # noqa: E731
        return greedy_meta_loss(model, blocks, net, TaskState(), norm, loss, loss, seed=seed, eps=1e-3, lr=0.03,
                                zsrc=zsrc).meta_loss  # fmt: skip

    def mean_meta_loss() -> float:
        with torch.no_grad():
            return sum(float(meta(t, s)) for t, s in pairs) / len(pairs)

    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    before = mean_meta_loss()
    for step in range(20):
        opt.zero_grad()
        meta(*pairs[step % len(pairs)]).backward()
        opt.step()
    assert mean_meta_loss() < before - 1e-3


@pytest.mark.parametrize("differentiable_g", [False, True])
def test_unrolled_meta_gradient_finite_nonzero(differentiable_g: bool) -> None:
    model, blocks, net, norm, loss = _setup()
    other = lambda m: lm_loss(m, torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(9)))  # noqa: E731
    res = unrolled_meta_loss(model, blocks, net, TaskState(), norm, [loss, other, loss], other, seeds=[1, 2, 3],
                             eps=1e-3, lr=1e-2, zsrc=ZSource(), differentiable_g=differentiable_g)  # fmt: skip
    res.meta_loss.backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_unrolled_with_one_step_is_the_greedy_objective() -> None:
    model, blocks, net, norm, loss = _setup()
    a = greedy_meta_loss(model, blocks, net, TaskState(), norm, loss, loss, seed=4, eps=1e-3, lr=1e-2, zsrc=ZSource())
    a.meta_loss.backward()
    ga = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    b = unrolled_meta_loss(
        model, blocks, net, TaskState(), norm, [loss], loss, seeds=[4], eps=1e-3, lr=1e-2, zsrc=ZSource()
    )
    b.meta_loss.backward()
    assert float(b.meta_loss) == pytest.approx(float(a.meta_loss), rel=1e-6)
    for x, y in zip(ga, (p.grad for p in net.parameters())):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-9)  # the probes round differently (in/out of place)


def test_on_policy_step_is_a_learned_zo_step() -> None:
    model, blocks, net, norm, loss = _setup()
    twin = copy.deepcopy(model)
    opt = LearnedZO(twin, net, lr=1e-2, eps=1e-3, seed=3)
    res = greedy_meta_loss(model, blocks, net, TaskState(), norm, loss, loss, seed=mix_seed(3, 0), eps=1e-3, lr=1e-2,
                           zsrc=ZSource())  # fmt: skip
    on_policy_step(blocks, res.probe, res.sigma.eff.detach().tolist(), 1e-2, ZSource())
    opt.step(lambda: loss(twin))
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)  # LearnedZO fuses restore and update


def test_periodic_reset_restores_pretrained_weights_exactly() -> None:
    model, blocks, net, norm, loss = _setup()
    pretrained = PretrainedCopy(blocks)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    teacher = make_teacher(blocks, lr=0.05)
    for step in range(3):
        teacher_step(model, blocks, teacher, lambda: loss(model), teacher_lr(0.05, step, period=3))
    assert not torch.equal(model.model.embed_tokens.weight, reference["model.embed_tokens.weight"])
    pretrained.restore_(blocks)
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tie survives the reset


def test_plan_is_a_pure_function_of_seed_and_step() -> None:
    kw = dict(sizes=[(20, 8), (30, 8)], weights=[0.0, 1.0], batch_size=4, unroll=2, heldout=True, p_teacher=0.5)
    a, b = plan_step(0, 5, **kw), plan_step(0, 5, **kw)
    assert a == b and a.task == 1 and len(a.inner) == 2 and a.outer is not None
    assert plan_step(0, 6, **kw) != a


def test_tiny_yaml_is_a_valid_config() -> None:
    cfg = build_config(MetaTrainConfig, REPO / "meta_configs" / "tiny.yaml", {})
    assert cfg.data.model == "tiny" and cfg.output.startswith("checkpoints/tiny/") and cfg.logdir.startswith("runs/")


# ------------------------------------------------------------------------------------ the Lightning pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("meta_model")
    tiny_llama(vocab=300).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


def _cfg(model_dir: Path, tmp: Path, name: str, steps: int) -> MetaTrainConfig:
    overrides = {"model": str(model_dir), "tasks": ["synth-sentiment", "synth-parity"], "num_train": 24,
                 "num_dev": 8, "batch_size": 4, "max_length": 40, "steps": steps, "reset_every": 4,
                 "checkpoint_every": 3, "p_teacher": 0.5, "outer_batch": "heldout", "progress": False,
                 "output": str(tmp / name / "artifact"), "logdir": str(tmp / name / "run"), "histogram_every": 2}  # fmt: skip
    return build_config(MetaTrainConfig, overrides=overrides)


def _ckpt(cfg: MetaTrainConfig) -> dict:
    return torch.load(Path(cfg.logdir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def test_meta_training_resumes_exactly(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from l2zo.learned.artifact import read_artifact
    from l2zo.train.meta_module import MetaTrainModule
    from l2zo.train.meta_train import run_meta_train

    n = 6
    full = _cfg(model_dir, tmp_path, "full", 2 * n)
    run_meta_train(full)
    first = _cfg(model_dir, tmp_path, "resumed", n)
    run_meta_train(first)  # stops after n steps: the "kill"; its last.ckpt is at step n
    second = _cfg(model_dir, tmp_path, "resumed", 2 * n)
    steps_run: list[int] = []
    original = MetaTrainModule.training_step

    def counting(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        steps_run.append(int(self.global_step))
        return original(self, batch, batch_idx)

    monkeypatch.setattr(MetaTrainModule, "training_step", counting)
    path = run_meta_train(second, resume=str(Path(first.logdir) / "checkpoints" / "last.ckpt"), overwrite=True)
    assert steps_run == list(range(n, 2 * n))  # it resumed at step n, it did not start over

    net_a, manifest = read_artifact(full.output)
    net_b, _ = read_artifact(path)
    assert manifest["meta_training"]["steps"] == 2 * n
    for (k, a), b in zip(net_a.state_dict().items(), net_b.state_dict().values()):
        assert torch.equal(a, b), k  # identical: every random choice is a function of (seed, step)
    ca, cb = _ckpt(full), _ckpt(second)
    assert ca["global_step"] == cb["global_step"] == 2 * n
    for k, v in ca["state_dict"].items():
        assert torch.equal(v, cb["state_dict"][k]), k  # theta and the net
    assert ca["l2zo_meta"]["history"] == cb["l2zo_meta"]["history"]
    # 2n = 12 is a multiple of reset_every = 4: theta was just reset to the pretrained weights.
    pretrained = tiny_llama(vocab=300).state_dict()
    for k, v in pretrained.items():
        assert torch.equal(ca["state_dict"][f"model.{k}"], v), k
