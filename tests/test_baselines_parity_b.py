"""Parity of forward-grad, LOZO/LOZO-M, MeZO-SVRG and FZOO with dense implementations of their formulas.

Each test materialises the directions (seeded z, or the perturbation the closure actually saw),
applies the method's published update with plain tensors, and compares with the optimizer's in-place,
fused update at tight fp32 tolerances. Projected gradients are also recomputed densely (looser: a
loss difference divided by 2*eps amplifies ulp-level rounding).
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from l2zo.engine import ZSource, partition
from l2zo.errors import L2ZOError
from l2zo.optim import build_optimizer
from l2zo.optim.methods.forward_grad import ForwardGrad
from l2zo.optim.methods.fzoo import FZOO
from l2zo.optim.methods.lozo import LOZO, LOZOM
from l2zo.optim.methods.mezo_svrg import MeZOSVRG
from tests.helpers import Quadratic, lm_loss, tiny_llama

TIGHT = dict(rtol=0.0, atol=2e-6)
G_TOL = dict(rel=2e-3, abs=2e-3)


def _ids(seed: int = 0, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 97, (batch, 10), generator=torch.Generator().manual_seed(seed))


def _snap(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {b.name: b.param.detach().clone() for b in partition(model)}


def _dense_loss(model: torch.nn.Module, params: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """lm_loss at explicit parameter values (tied weights follow their owner)."""
    with torch.no_grad():
        logits = functional_call(model, params, kwargs={"input_ids": ids}).logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _spsa(model, theta: dict, z: dict, eps: float, ids: torch.Tensor) -> float:
    plus = {n: theta[n] + eps * z[n] for n in theta}
    minus = {n: theta[n] - eps * z[n] for n in theta}
    return float((_dense_loss(model, plus, ids) - _dense_loss(model, minus, ids)) / (2 * eps))


def _wd(name: str, theta: dict, wd: float) -> float:
    return wd if theta[name].dim() >= 2 else 0.0


# -- forward-grad -------------------------------------------------------------------------------------
def test_forward_grad_jvp_matches_autograd_and_update_formula():
    model, ids, lr, wd = tiny_llama(), _ids(), 1e-2, 0.1
    theta0 = _snap(model)
    with torch.enable_grad():
        grads = torch.autograd.grad(lm_loss(model, ids), [b.param for b in partition(model)])
    opt = ForwardGrad(model, lr=lr, weight_decay=wd, seed=5)
    seed = opt.step_seed(0)
    loss = opt.step(lambda: lm_loss(model, ids))
    zs = ZSource()
    z = {b.name: zs.full(b.param, seed, b.index) for b in partition(model)}
    directional = sum(float((g * z[b.name]).sum()) for g, b in zip(grads, partition(model)))
    g = opt.last_probe.projected_grad
    assert g == pytest.approx(directional, rel=1e-4, abs=1e-5)
    torch.testing.assert_close(loss, _dense_loss(model, theta0, ids), rtol=1e-6, atol=1e-6)
    for b in partition(model):
        expected = theta0[b.name] - lr * (g * z[b.name] + _wd(b.name, theta0, wd) * theta0[b.name])
        torch.testing.assert_close(b.param.detach(), expected, **TIGHT)


def test_forward_grad_unsupported_models_raise_clear_errors():
    with pytest.raises(L2ZOError, match="nn.Module"):
        ForwardGrad(list(Quadratic().parameters()))
    model, ids = tiny_llama(), _ids()
    model.config._attn_implementation = "sdpa"  # CPU flash attention: no forward-mode AD
    theta0 = _snap(model)
    opt = ForwardGrad(model, lr=1e-2)
    with pytest.raises(L2ZOError, match="forward-mode AD.*eager"):
        opt.step(lambda: lm_loss(model, ids))
    for b in partition(model):
        assert torch.equal(b.param.detach(), theta0[b.name])


# -- LOZO / LOZO-M ------------------------------------------------------------------------------------
def _run_recording(opt, model, ids, steps: int):
    """Step ``steps`` times; per step: (theta before, the perturbation u seen by the first forward, state after)."""
    log = []
    for _ in range(steps):
        before = _snap(model)
        seen = []

        def closure(seen=seen):
            if not seen:
                seen.append(_snap(model))
            return lm_loss(model, ids)

        seed = opt.step_seed(opt.step_count)
        opt.step(closure)
        u = {n: (seen[0][n] - before[n]) / opt.eps for n in before}
        vs = {b.name: opt.state[b.param]["V"].clone() for b in opt._mats}
        log.append((before, u, seed, opt.last_probe.projected_grad, vs, _snap(model)))
    return log


def test_lozo_update_moves_along_the_measured_low_rank_direction():
    model, ids, lr, wd, eps, rank = tiny_llama(), _ids(), 1e-2, 0.1, 1e-3, 2
    opt = LOZO(model, lr=lr, eps=eps, rank=rank, nu=2, weight_decay=wd, seed=1)
    log = _run_recording(opt, model, ids, steps=3)  # V drawn at step 0, kept at 1, resampled at 2
    blocks = {b.name: b for b in partition(model)}
    zs = ZSource()
    for before, u, seed, g, vs, after in log:
        assert g == pytest.approx(_spsa(model, before, u, eps, ids), **G_TOL)
        for name, b in blocks.items():
            if b.param.dim() >= 2:
                dense_u = opt.factor_u(b, seed) @ vs[name].t()  # U V^T with the V stored for this step
                assert torch.linalg.matrix_rank(dense_u) == rank
            else:
                dense_u = zs.full(b.param, seed, b.index)
            torch.testing.assert_close(u[name], dense_u, rtol=0, atol=5e-4)  # measured = U V^T (to ulp/eps)
            expected = before[name] - lr * (g * dense_u + _wd(name, before, wd) * before[name])
            torch.testing.assert_close(after[name], expected, **TIGHT)
    mats = [n for n, b in blocks.items() if b.param.dim() >= 2]
    assert all(torch.equal(log[0][4][n], log[1][4][n]) for n in mats)  # lazy: V kept within nu steps
    assert not any(torch.equal(log[1][4][n], log[2][4][n]) for n in mats)  # resampled at step nu


def test_lozo_m_matches_dense_factor_momentum():
    model, ids, lr, eps, rank, beta = tiny_llama(), _ids(), 1e-2, 1e-3, 2, 0.8
    opt = LOZOM(model, lr=lr, eps=eps, rank=rank, nu=2, beta=beta, seed=2)
    log = _run_recording(opt, model, ids, steps=3)
    blocks = {b.name: b for b in partition(model)}
    zs = ZSource()
    mom: dict[str, torch.Tensor] = {}
    prev_v: dict[str, torch.Tensor] = {}
    for t, (before, u, seed, g, vs, after) in enumerate(log):
        for name, b in blocks.items():
            if b.param.dim() >= 2:
                uf, v = opt.factor_u(b, seed), vs[name]
                torch.testing.assert_close(u[name], uf @ v.t(), rtol=0, atol=5e-4)
                m = mom.get(name, torch.zeros_like(uf))
                if t == 2:  # resample step: carry M into the new V's coordinates
                    m = m @ (prev_v[name].t() @ v) / v.shape[0]
                mom[name] = beta * m + (1 - beta) * g * uf
                expected = before[name] - lr * mom[name] @ v.t()
                prev_v[name] = v
            else:
                z = zs.full(b.param, seed, b.index)
                mom[name] = beta * mom.get(name, torch.zeros_like(z)) + (1 - beta) * g * z
                expected = before[name] - lr * mom[name]
            torch.testing.assert_close(after[name], expected, **TIGHT)


# -- MeZO-SVRG ----------------------------------------------------------------------------------------
def _svrg(model, **kw) -> tuple[MeZOSVRG, torch.Tensor]:
    ids_full = _ids(7, batch=8)
    opt = build_optimizer("mezo-svrg", model, **kw)
    opt.set_anchor_loss_fn(lambda: lm_loss(model, ids_full))
    return opt, ids_full


def test_svrg_matches_dense_formula():
    model, ids, eps, lr, lr_full, wd = tiny_llama(), _ids(), 1e-3, 1e-2, 5e-2, 0.1
    opt, ids_full = _svrg(model, lr=lr, lr_full=lr_full, eps=eps, q=2, weight_decay=wd, seed=4)
    zs = ZSource()
    blocks = partition(model)
    theta0 = _snap(model)
    opt.step(lambda: lm_loss(model, ids))  # step 0: full batch
    s0, g_full = opt.step_seed(0), opt.last_probe.projected_grad
    z_full = {b.name: zs.full(b.param, s0, b.index) for b in blocks}
    assert g_full == pytest.approx(_spsa(model, theta0, z_full, eps, ids_full), **G_TOL)
    theta1 = _snap(model)
    for b in blocks:
        n = b.name
        expected = theta0[n] - lr_full * (g_full * z_full[n] + _wd(n, theta0, wd) * theta0[n])
        torch.testing.assert_close(theta1[n], expected, **TIGHT)
        torch.testing.assert_close(opt.state[b.param]["anchor"], theta0[n], rtol=0, atol=1e-6)
    loss = opt.step(lambda: lm_loss(model, ids))  # step 1: SVRG minibatch step
    s1 = opt.step_seed(1)
    z = {b.name: zs.full(b.param, s1, b.index) for b in blocks}
    g1, g2 = opt.last_probe.projected_grad, opt.last_anchor_probe.projected_grad
    assert g1 == pytest.approx(_spsa(model, theta1, z, eps, ids), **G_TOL)
    assert g2 == pytest.approx(_spsa(model, theta0, z, eps, ids), **G_TOL)  # at the anchor, same z
    torch.testing.assert_close(loss, _dense_loss(model, theta1, ids), rtol=0, atol=2e-4)  # (L+ + L-)/2 = L + O(eps^2)
    for b in blocks:
        n = b.name
        vr = (g1 - g2) * z[n] + g_full * z_full[n]
        torch.testing.assert_close(b.param.detach(), theta1[n] - lr * (vr + _wd(n, theta1, wd) * theta1[n]), **TIGHT)
        torch.testing.assert_close(opt.state[b.param]["anchor"], theta0[n], rtol=0, atol=1e-6)
    assert opt.forward_counts == {"minibatch": 4, "full_batch": 2}


def test_svrg_with_anchor_equal_to_theta_is_the_full_batch_step():
    model, ids, lr = tiny_llama(), _ids(), 1e-2
    opt, _ = _svrg(model, lr=lr, lr_full=0.0, eps=1e-3, q=3, seed=8)
    opt.step(lambda: lm_loss(model, ids))  # lr_full = 0: theta stays at the anchor
    s0, g_full = opt.step_seed(0), opt.last_probe.projected_grad
    zs = ZSource()
    for _ in range(2):  # two minibatch steps; the second is at theta != anchor
        theta = _snap(model)
        at_anchor = all(torch.equal(b.param, opt.state[b.param]["anchor"]) for b in partition(model))
        opt.step(lambda: lm_loss(model, _ids(1)))
        if at_anchor:
            assert opt.last_probe.projected_grad == opt.last_anchor_probe.projected_grad
            for b in partition(model):
                expected = theta[b.name] - lr * g_full * zs.full(b.param, s0, b.index)
                torch.testing.assert_close(b.param.detach(), expected, **TIGHT)
        else:
            assert opt.last_probe.projected_grad != opt.last_anchor_probe.projected_grad
    assert opt.step_count == 3


def test_svrg_without_hook_raises_and_leaves_theta():
    q = Quadratic()
    opt = MeZOSVRG(q, lr=1e-2)
    w0 = q.w.detach().clone()
    with pytest.raises(L2ZOError, match="set_anchor_loss_fn"):
        opt.step(q.loss)
    assert torch.equal(q.w, w0) and opt.step_count == 0


# -- FZOO ---------------------------------------------------------------------------------------------
def test_fzoo_is_the_normalised_average_over_n_rademacher_directions():
    model, ids, lr, eps, wd, n = tiny_llama(), _ids(), 1e-2, 1e-3, 0.1, 4
    opt = FZOO(model, lr=lr, eps=eps, num_directions=n, weight_decay=wd, seed=3)
    theta0 = _snap(model)
    seen, losses = [], []

    def closure():
        seen.append(_snap(model))
        losses.append(lm_loss(model, ids))
        return losses[-1]

    step_seed = opt.step_seed(0)
    loss = opt.step(closure)
    assert len(seen) == n + 1
    blocks = partition(model)
    seeds = [opt.direction_seed(step_seed, i) for i in range(n)]
    z = [{b.name: opt.full_direction(b.param, s, b.index) for b in blocks} for s in seeds]
    for i in range(n):  # forward i+1 saw exactly theta + eps z_i (restores fused, nothing accumulates)
        for b in blocks:
            assert set(z[i][b.name].unique().tolist()) <= {-1.0, 1.0}
            torch.testing.assert_close((seen[i + 1][b.name] - theta0[b.name]) / eps, z[i][b.name], rtol=0, atol=1e-3)
        dense = _dense_loss(model, {k: theta0[k] + eps * z[i][k] for k in theta0}, ids)
        torch.testing.assert_close(losses[i + 1], dense, rtol=0, atol=1e-5)
    assert torch.equal(seen[0][blocks[0].name], theta0[blocks[0].name]) and torch.equal(loss, losses[0])
    ls = torch.stack(losses[1:])
    c = (ls - losses[0]) / (n * ls.std(correction=0))
    for b in blocks:
        step = sum(float(c[i]) * z[i][b.name] for i in range(n))
        expected = theta0[b.name] - lr * (step + _wd(b.name, theta0, wd) * theta0[b.name])
        torch.testing.assert_close(b.param.detach(), expected, **TIGHT)
    assert opt.last_probe.projected_grad == pytest.approx(float((ls - losses[0]).mean()) / eps, rel=1e-5)


def test_fzoo_equal_losses_give_a_no_op_step():
    q = Quadratic()
    w0, v0 = q.w.detach().clone(), q.v.detach().clone()
    opt = FZOO(q, lr=1.0, num_directions=3)
    opt.step(lambda: torch.tensor(1.0))
    torch.testing.assert_close(q.w.detach(), w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(q.v.detach(), v0, rtol=0, atol=1e-6)
    with pytest.raises(L2ZOError, match="num_directions"):
        FZOO(q, num_directions=1)
