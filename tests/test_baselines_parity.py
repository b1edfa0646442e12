"""Parity: each ZO baseline's in-place, chunked step equals its paper formula written densely.

For every step the test snapshots theta (and the optimizer state) exactly, lets the optimizer step,
then rebuilds z with ``ZSource.full`` and applies the formula with plain tensors (fp32, tight
tolerances). Where the perturbation itself is method-specific (HiZOO, Sparse MeZO, ZO-SGD-Cons), the
losses are also recomputed densely on a copy of the model, which checks the direction probed.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from l2zo.engine import ZSource
from l2zo.optim.methods.first_order import FOSGD, FOAdam
from l2zo.optim.methods.hizoo import HiZOO
from l2zo.optim.methods.sparse_mezo import SparseMeZO
from l2zo.optim.methods.zo_adam import ZOAdam
from l2zo.optim.methods.zo_sgd_variants import ZOSGDConservative, ZOSGDMomentum, ZOSGDSign
from tests.helpers import Quadratic, lm_loss, tiny_llama

WD = 0.1
TOL = dict(rtol=1e-5, atol=2e-6)


def _setup():
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    return model, ids, copy.deepcopy(model)


def _snapshot(opt):
    theta = [b.param.detach().clone() for b in opt.blocks]
    state = [{k: v.clone() for k, v in opt.state[b.param].items() if isinstance(v, torch.Tensor)} for b in opt.blocks]
    return theta, state


def _z(opt):
    zs, seed = ZSource(), opt.last_probe.seed
    return [zs.full(b.param, seed, b.index) for b in opt.blocks]


def _wd(opt, b):
    return WD if b.param.dim() >= 2 else 0.0


def _loss_at(ref, ids, opt, thetas):
    """L(thetas) evaluated densely on the reference copy of the model."""
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for b, t in zip(opt.blocks, thetas):
            params[b.name].copy_(t)
        return lm_loss(ref, ids).item()


def _shift(theta, u, scale):
    return [t + scale * d for t, d in zip(theta, u)]


def _check(opt, expected_theta, expected_state=None):
    for i, b in enumerate(opt.blocks):
        torch.testing.assert_close(b.param.detach(), expected_theta[i], **TOL, msg=b.name)
        for key, value in (expected_state or [{}] * len(opt.blocks))[i].items():
            got = opt.state[b.param][key].view_as(value)
            assert got.dtype == torch.float32, key
            torch.testing.assert_close(got, value, **TOL, msg=f"{b.name}:{key}")


# -- ZO-SGD-MMT, ZO-SGD-Sign, ZO-Adam: 3 steps each, state carried ------------------------------------
def test_zo_sgd_momentum_matches_dense_formula():
    model, ids, _ = _setup()
    lr, beta = 1e-2, 0.9
    opt = ZOSGDMomentum(model, lr=lr, eps=1e-3, momentum=beta, weight_decay=WD, seed=1)
    for _ in range(3):
        theta, state = _snapshot(opt)
        opt.step(lambda: lm_loss(model, ids))
        g = opt.last_probe.projected_grad
        exp_t, exp_s = [], []
        for b, t, st, z in zip(opt.blocks, theta, state, _z(opt)):
            m = st.get("momentum", torch.zeros(t.numel())).view_as(t)
            m = beta * m + (g * z + _wd(opt, b) * t)
            exp_t.append(t - lr * m)
            exp_s.append({"momentum": m})
        _check(opt, exp_t, exp_s)


@pytest.mark.parametrize("elementwise", [False, True])
def test_zo_sgd_sign_matches_dense_formula(elementwise: bool):
    model, ids, _ = _setup()
    lr = 1e-3
    opt = ZOSGDSign(model, lr=lr, eps=1e-3, elementwise=elementwise, weight_decay=WD, seed=2)
    for _ in range(2):
        theta, _ = _snapshot(opt)
        opt.step(lambda: lm_loss(model, ids))
        g = opt.last_probe.projected_grad
        direction = [torch.sign(g * z) if elementwise else math.copysign(1.0, g) * z for z in _z(opt)]
        _check(opt, [t - lr * (d + _wd(opt, b) * t) for b, t, d in zip(opt.blocks, theta, direction)])


def test_zo_adam_matches_dense_formula():
    model, ids, _ = _setup()
    lr, (b1, b2), ae = 1e-3, (0.9, 0.999), 1e-8
    opt = ZOAdam(model, lr=lr, eps=1e-3, betas=(b1, b2), adam_eps=ae, weight_decay=WD, seed=3)
    for t_step in range(1, 4):
        theta, state = _snapshot(opt)
        opt.step(lambda: lm_loss(model, ids))
        g = opt.last_probe.projected_grad
        exp_t, exp_s = [], []
        for b, t, st, z in zip(opt.blocks, theta, state, _z(opt)):
            grad = g * z
            m = b1 * st.get("exp_avg", torch.zeros(t.numel())).view_as(t) + (1 - b1) * grad
            v = b2 * st.get("exp_avg_sq", torch.zeros(t.numel())).view_as(t) + (1 - b2) * grad * grad
            m_hat, v_hat = m / (1 - b1**t_step), v / (1 - b2**t_step)
            exp_t.append(t * (1 - lr * _wd(opt, b)) - lr * m_hat / (v_hat.sqrt() + ae))
            exp_s.append({"exp_avg": m, "exp_avg_sq": v})
        _check(opt, exp_t, exp_s)


# -- HiZOO: perturbation z / sqrt(H), Hessian update, update with the new H ---------------------------
def test_hizoo_matches_dense_formula():
    model, ids, ref = _setup()
    lr, eps, alpha = 1e-2, 1e-3, 0.05  # a large alpha so that H really moves
    opt = HiZOO(model, lr=lr, eps=eps, hessian_smooth=alpha, weight_decay=WD, seed=4)
    for _ in range(3):
        theta, state = _snapshot(opt)
        l0 = opt.step(lambda: lm_loss(model, ids)).item()
        p = opt.last_probe
        zs = _z(opt)
        hs = [st.get("hessian", torch.ones(t.numel())).view_as(t) for t, st in zip(theta, state)]
        u = [z / h.sqrt() for z, h in zip(zs, hs)]
        # The losses the optimizer measured are the dense ones at theta, theta +- eps*u.
        assert l0 == pytest.approx(_loss_at(ref, ids, opt, theta), abs=1e-5)
        assert p.loss_plus.item() == pytest.approx(_loss_at(ref, ids, opt, _shift(theta, u, eps)), abs=1e-5)
        assert p.loss_minus.item() == pytest.approx(_loss_at(ref, ids, opt, _shift(theta, u, -eps)), abs=1e-5)
        curv = abs(p.loss_plus.item() + p.loss_minus.item() - 2 * l0) / (2 * eps**2)
        exp_t, exp_s = [], []
        for b, t, z, h in zip(opt.blocks, theta, zs, hs):
            h_new = (1 - alpha) * h + alpha * curv * h * z * z
            exp_t.append(t - lr * (p.projected_grad * z / h_new.sqrt() + _wd(opt, b) * t))
            exp_s.append({"hessian": h_new})
        _check(opt, exp_t, exp_s)
    assert any((opt.state[b.param]["hessian"] != 1).any() for b in opt.blocks)


# -- Sparse MeZO: fixed thresholds, mask from the unperturbed weights, masked-out entries untouched ----
def test_sparse_mezo_matches_dense_formula_and_leaves_masked_out_entries_unchanged():
    model, ids, ref = _setup()
    lr, eps, sparsity = 1e-3, 1e-3, 0.7
    opt = SparseMeZO(model, lr=lr, eps=eps, sparsity=sparsity, weight_decay=WD, seed=5)
    theta0 = [b.param.detach().clone() for b in opt.blocks]
    for _ in range(3):
        theta, _ = _snapshot(opt)
        opt.step(lambda: lm_loss(model, ids))
        p = opt.last_probe
        masks = []
        for b, t0, t in zip(opt.blocks, theta0, theta):
            a = t0.abs().reshape(-1)
            h = a.kthvalue(max(1, math.ceil((1 - sparsity) * a.numel()))).values  # fixed from the first step
            assert float(opt.state[b.param]["threshold"]) == float(h)
            masks.append((t.abs() <= h).to(t.dtype))
        u = [m * z for m, z in zip(masks, _z(opt))]
        assert p.loss_plus.item() == pytest.approx(_loss_at(ref, ids, opt, _shift(theta, u, eps)), abs=1e-5)
        assert p.loss_minus.item() == pytest.approx(_loss_at(ref, ids, opt, _shift(theta, u, -eps)), abs=1e-5)
        g = p.projected_grad
        exp_t = [t - lr * m * (g * z_ + _wd(opt, b) * t) for b, t, m, z_ in zip(opt.blocks, theta, masks, _z(opt))]
        _check(opt, exp_t)
        for b, t, m in zip(opt.blocks, theta, masks):
            out = m == 0
            assert torch.equal(b.param.detach()[out], t[out]), f"{b.name}: a masked-out entry moved"
        # Matrices are ~70% masked out; norm gains (all 1 here) tie at the threshold and are all tuned.
        assert all(0.1 < float(m.mean()) < 0.5 for b, m in zip(opt.blocks, masks) if b.param.dim() >= 2)


# -- ZO-SGD-Cons: the five losses, the greedy choice, and the final position --------------------------
def test_zo_sgd_cons_matches_dense_formula():
    model, ids, ref = _setup()
    lr, eps = 5e-2, 1e-3
    opt = ZOSGDConservative(model, lr=lr, eps=eps, weight_decay=WD, seed=6)
    for _ in range(3):
        theta, _ = _snapshot(opt)
        opt.step(lambda: lm_loss(model, ids))
        g, zs = opt.last_probe.projected_grad, _z(opt)
        cands = [theta, [t - lr * g * z for t, z in zip(theta, zs)], [t + lr * g * z for t, z in zip(theta, zs)]]
        losses = [_loss_at(ref, ids, opt, c) for c in cands]
        assert opt.last_losses == pytest.approx(losses, abs=1e-5)
        assert opt.last_choice == ZOSGDConservative.choose(*losses)
        if sorted(losses)[1] - sorted(losses)[0] > 1e-4:  # no near tie: the kept point is the argmin
            assert opt.last_choice == min(range(3), key=losses.__getitem__)
        kept = cands[opt.last_choice]
        _check(opt, [t * (1 - lr * _wd(opt, b)) for b, t in zip(opt.blocks, kept)])


@pytest.mark.parametrize(
    "l0, l1, l2, choice",
    [
        (1.0, 0.5, 2.0, 1),  # theta - lr g z best
        (1.0, 2.0, 3.0, 0),  # both candidates worse: stay
        (1.0, 2.0, 0.5, 2),  # theta + lr g z best
        (1.0, 0.5, 0.2, 2),
        (1.0, 1.0, 1.0, 2),  # ties go to theta + lr g z, as ZO-Bench
        (1.0, float("nan"), 2.0, 0),  # a non-finite candidate never wins
        (1.0, 0.5, float("inf"), 1),
    ],
)
def test_zo_sgd_cons_keeps_the_argmin_of_scripted_losses(l0, l1, l2, choice):
    q = Quadratic(seed=3)
    lr, eps = 0.1, 1e-3
    opt = ZOSGDConservative(q, lr=lr, eps=eps, seed=7)
    theta = [b.param.detach().clone() for b in opt.blocks]
    script = iter([l0, 0.7, 0.3, l1, l2])  # L(theta), L+, L-, L(A), L(B): g = 0.4 / (2 eps)
    loss = opt.step(lambda: torch.tensor(next(script)))
    assert loss.item() == l0 and opt.last_choice == choice
    g = opt.last_probe.projected_grad
    assert g == pytest.approx(0.4 / (2 * eps))
    zs = _z(opt)
    sign = {0: 0.0, 1: -1.0, 2: 1.0}[choice]
    for b, t, z in zip(opt.blocks, theta, zs):
        torch.testing.assert_close(b.param.detach(), t + sign * lr * g * z, rtol=1e-6, atol=1e-5)


def test_zo_sgd_cons_never_increases_the_batch_loss():
    q = Quadratic(seed=4)
    opt = ZOSGDConservative(q, lr=0.5, eps=1e-3, seed=8)  # a large lr: candidates often overshoot
    seen = set()
    for _ in range(60):
        before = q.loss().item()
        opt.step(q.loss)
        after = q.loss().item()
        assert after == pytest.approx(min(opt.last_losses), abs=1e-5)
        assert after <= before + 1e-5
        seen.add(opt.last_choice)
    assert 0 in seen and 1 in seen


# -- first-order wrappers: torch SGD / AdamW, decay on matrices only ---------------------------------
@pytest.mark.parametrize("cls", [FOSGD, FOAdam])
def test_first_order_wrappers_decay_matrices_only(cls):
    model, ids, _ = _setup()
    lr = 1e-2
    opt = cls(model, lr=lr, weight_decay=WD)
    theta = [p.detach().clone() for p in model.parameters()]
    grads = torch.autograd.grad(lm_loss(model, ids), list(model.parameters()))

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model, ids)
        loss.backward()
        return loss

    opt.step(closure)
    for p, t, gr in zip(model.parameters(), theta, grads):
        wd = WD if p.dim() >= 2 else 0.0
        if cls is FOSGD:
            expected = t - lr * (gr + wd * t)
        else:  # AdamW step 1: m_hat = g, v_hat = g^2
            expected = t * (1 - lr * wd) - lr * gr / (gr.abs() + 1e-8)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)
