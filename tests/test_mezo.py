"""MeZO as a torch.optim.Optimizer: the fused update, decay, schedulers, state_dict, errors."""

from __future__ import annotations

import pytest
import torch

from l2zo.engine import ZSource, partition
from l2zo.errors import L2ZOError
from l2zo.optim import MeZO, NonFiniteLossError, build_optimizer
from tests.helpers import Quadratic, lm_loss, tiny_llama


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(seed))


def test_update_matches_dense_mezo_formula():
    """theta <- theta - lr*(g*z + wd*theta) on matrices, without decay on 1-D blocks."""
    model = tiny_llama()
    ids = _ids()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = MeZO(model, lr=1e-2, eps=1e-3, weight_decay=0.1, seed=4)
    opt.step(lambda: lm_loss(model, ids))
    g, seed = opt.last_probe.projected_grad, opt.last_probe.seed
    zs = ZSource()
    for b in partition(model):
        z = zs.full(b.param, seed, b.index)
        wd = 0.1 if b.param.dim() >= 2 else 0.0
        expected = theta0[b.name] - 1e-2 * (g * z + wd * theta0[b.name])
        torch.testing.assert_close(b.param.detach(), expected, rtol=0, atol=2e-6)


def test_lr_zero_leaves_parameters_within_ulps():
    model = tiny_llama()
    ids = _ids()
    theta0 = [p.detach().clone() for p in model.parameters()]
    opt = MeZO(model, lr=0.0, eps=1e-3)
    for _ in range(3):
        opt.step(lambda: lm_loss(model, ids))
    for p, t0 in zip(model.parameters(), theta0):
        torch.testing.assert_close(p.detach(), t0, rtol=1e-6, atol=1e-8)


def test_loss_falls_on_quadratic_and_lm():
    q = Quadratic(seed=1)
    opt = MeZO(q, lr=0.05, eps=1e-3, seed=0)
    start = q.loss().item()
    for _ in range(300):
        opt.step(q.loss)
    assert q.loss().item() < start - 1.0

    model = tiny_llama()
    ids = _ids()
    opt = MeZO(model, lr=3e-3, eps=1e-3)
    with torch.no_grad():
        before = lm_loss(model, ids).item()
    for _ in range(60):
        opt.step(lambda: lm_loss(model, ids))
    with torch.no_grad():
        assert lm_loss(model, ids).item() < before


def test_dropout_is_off_during_zo_forwards_and_mode_restored():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    model.train()
    x = torch.randn(16, 8)
    seen = []

    def closure():
        seen.append(model[1].training)
        return model(x).pow(2).mean()

    MeZO(model, lr=1e-3).step(closure)
    assert seen == [False, False]
    assert model.training and model[1].training


def test_scheduler_and_state_dict_round_trip():
    q = Quadratic()
    opt = MeZO(q, lr=0.1, eps=1e-3, seed=9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(q.loss)
    sched.step()
    assert all(g["lr"] == pytest.approx(0.05) for g in opt.param_groups)
    sd = opt.state_dict()

    q2 = Quadratic()
    with torch.no_grad():
        q2.w.copy_(q.w)
        q2.v.copy_(q.v)
    opt2 = MeZO(q2, lr=0.1, eps=1e-3, seed=0)
    opt2.load_state_dict(sd)
    assert opt2.step_count == 1 and opt2.seed == 9
    assert all(g["lr"] == pytest.approx(0.05) for g in opt2.param_groups)
    # Same state -> same next step, bit for bit.
    opt.step(q.loss)
    opt2.step(q2.loss)
    assert torch.equal(q.w, q2.w) and torch.equal(q.v, q2.v)


def test_closure_required_and_nan_loss_restores():
    q = Quadratic()
    opt = MeZO(q, lr=0.1)
    with pytest.raises(L2ZOError, match="closure"):
        opt.step()
    w0 = q.w.detach().clone()
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        opt.step(lambda: torch.tensor(float("nan")))
    torch.testing.assert_close(q.w.detach(), w0, rtol=0, atol=1e-6)


def test_registry_validates_names_and_hyperparameters():
    q = Quadratic()
    assert isinstance(build_optimizer("mezo", q, lr=1e-3), MeZO)
    with pytest.raises(L2ZOError, match="unknown optimizer 'mezzo'.*mezo"):
        build_optimizer("mezzo", q)
    with pytest.raises(L2ZOError, match="no hyperparameter 'momentum'"):
        build_optimizer("mezo", q, momentum=0.9)
    with pytest.raises(L2ZOError, match="eps must be > 0"):
        build_optimizer("mezo", q, eps=0.0)


def test_plain_python_loop_as_in_readme():
    """The README's loop, verbatim in spirit: no Lightning."""
    model = tiny_llama()
    opt = MeZO(model, lr=1e-3, eps=1e-3)
    losses = [opt.step(lambda s=s: lm_loss(model, _ids(s % 2))).item() for s in range(4)]
    assert all(torch.isfinite(torch.tensor(losses)))
