"""The ZO engine: blocks, seeded z, in-place perturbation, the two-point estimator."""

from __future__ import annotations

import pytest
import torch

from l2zo.engine import (
    Z_CHUNK,
    NoiseTable,
    ZSource,
    block_kind,
    fingerprint,
    partition,
    perturb_,
    two_point_estimate,
    zo_probe,
)
from tests.helpers import Quadratic, lm_loss, tiny_llama


def _spacing(x: torch.Tensor) -> torch.Tensor:
    """One ulp at |x| in the dtype of x."""
    x = x.abs()
    return torch.nextafter(x, torch.full_like(x, float("inf"))) - x


def test_tied_weights_are_one_block():
    tied, untied = tiny_llama(tie=True), tiny_llama(tie=False)
    names_tied = [b.name for b in partition(tied)]
    names_untied = [b.name for b in partition(untied)]
    assert len(names_untied) == len(names_tied) + 1
    assert "lm_head.weight" in names_untied and "lm_head.weight" not in names_tied
    # Two distinct Parameter objects over one storage are also one block.
    w = torch.nn.Parameter(torch.randn(4, 4))
    alias = torch.nn.Parameter(w.data)
    assert len(partition([("a", w), ("b", alias)])) == 1


def test_include_exclude_patterns():
    model = tiny_llama()
    only_attn = partition(model, include=r"self_attn")
    assert only_attn and all("self_attn" in b.name for b in only_attn)
    no_norm = partition(model, exclude=[r"norm"])
    assert all("norm" not in b.name for b in no_norm)
    assert [b.index for b in no_norm] == list(range(len(no_norm)))


def test_fingerprint_is_architecture_not_weights():
    a, b = tiny_llama(seed=0), tiny_llama(seed=1)
    assert fingerprint(partition(a)) == fingerprint(partition(b))
    wider = tiny_llama(hidden=32)
    assert fingerprint(partition(wider)) != fingerprint(partition(a))
    assert block_kind("model.layers.3.self_attn.q_proj.weight") == "q_proj"
    assert block_kind("model.layers.3.self_attn.q_proj.bias") == "q_proj.bias"


def test_same_seed_same_z_and_chunking():
    zs = ZSource()
    p = torch.empty(Z_CHUNK + 5)  # two chunks
    z1, z2 = zs.full(p, seed=7, block_index=3), zs.full(p, seed=7, block_index=3)
    assert torch.equal(z1, z2)
    assert not torch.equal(z1, zs.full(p, seed=8, block_index=3))
    assert not torch.equal(z1, zs.full(p, seed=7, block_index=4))
    # Chunks of one block are not copies of each other.
    assert not torch.equal(z1[:5], z1[Z_CHUNK : Z_CHUNK + 5])
    # The global RNG is untouched.
    state = torch.get_rng_state()
    zs.full(p, seed=1, block_index=0)
    assert torch.equal(state, torch.get_rng_state())


def test_round_trip_restores_to_one_ulp_and_does_not_drift():
    model = tiny_llama()
    blocks = partition(model)
    theta0 = [b.param.detach().clone() for b in blocks]
    zs, eps = ZSource(), 1e-3
    perturb_(blocks, 11, zs, +eps)
    perturb_(blocks, 11, zs, -2 * eps)
    perturb_(blocks, 11, zs, +eps)
    for b, t0 in zip(blocks, theta0):
        z = zs.full(b.param, 11, b.index)
        bound = 2 * _spacing(t0.abs() + 2 * eps * z.abs())
        assert ((b.param - t0).abs() <= bound).all(), b.name
    # 200 more round trips: the error is a zero-mean random walk of ulp size, far below lr*g*z.
    for s in range(200):
        perturb_(blocks, s, zs, +eps)
        perturb_(blocks, s, zs, -2 * eps)
        perturb_(blocks, s, zs, +eps)
    # A random walk: after 200 round trips about sqrt(200) ~ 14 ulps; we allow 50.
    for b, t0 in zip(blocks, theta0):
        assert ((b.param - t0).abs() <= 50 * _spacing(t0.abs() + eps)).all(), b.name


def test_sigma_scales_each_block_independently():
    q = Quadratic()
    blocks = partition(q)
    zs = ZSource()
    w0, v0 = q.w.detach().clone(), q.v.detach().clone()
    perturb_(blocks, 5, zs, 0.1, sigma=[2.0, 0.0])
    assert torch.allclose(q.w, w0 + 0.2 * zs.full(q.w, 5, 0))
    assert torch.equal(q.v, v0)
    with torch.no_grad():
        q.w.copy_(w0)
    perturb_(blocks, 5, zs, 0.1, sigma=[1.0, 3.0])
    assert torch.allclose(q.w, w0 + 0.1 * zs.full(q.w, 5, 0))
    assert torch.allclose(q.v, v0 + 0.3 * zs.full(q.v, 5, 1))


@pytest.mark.parametrize("table", [False, True], ids=["randn", "noise-table"])
def test_estimator_is_unbiased_on_a_quadratic(table: bool):
    """Mean of g*u over 4000 seeds vs the true gradient, with z drawn by randn or from a noise table.

    For Gaussian z, Var[(z.grad) z_i] = |grad|^2 + grad_i^2, so the mean over N seeds has standard error
    sqrt((|grad|^2 + grad_i^2) / N) (for the table, up to E[z z^T]'s departure from I, ~1/sqrt(size) here: the
    quadratic's blocks lie within one window). Central differences are exact on a quadratic, so the only error is
    that sampling noise: we allow 4.5 standard errors per coordinate.
    """
    q = Quadratic(seed=3)
    blocks = partition(q)
    zs, n, sigma = ZSource(table=NoiseTable() if table else None), 4000, [1.0, 0.5]
    est = [torch.zeros_like(b.param) for b in blocks]
    for s in range(n):
        probe = two_point_estimate(q.loss, blocks, s, 1e-2, zs, sigma)
        for b, e in zip(blocks, est):
            e += probe.projected_grad * sigma[b.index] * zs.full(b.param, s, b.index)
    est = [e / n for e in est]
    gw, gv = q.grad()
    # E[g u] = Sigma^2 grad, with Sigma = diag(sigma_b): the preconditioned gradient.
    target = [gw * sigma[0] ** 2, gv * sigma[1] ** 2]
    total_sq = sum((t * t).sum() for t in target)
    for e, t in zip(est, target):
        se = torch.sqrt((total_sq + t * t) / n)
        assert ((e - t).abs() <= 4.5 * se).all(), (e, t)


def test_probe_restores_on_exception():
    q = Quadratic()
    blocks = partition(q)
    w0 = q.w.detach().clone()
    calls = []

    def boom():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("forward failed")
        return q.loss()

    try:
        zo_probe(boom, blocks, 0, 1e-3, ZSource())
    except RuntimeError:
        pass
    assert torch.allclose(q.w, w0, atol=1e-6)


def test_losses_are_fp32_and_g_nonzero_under_bf16_autocast():
    """The autocast weight cache must not serve L- with L+'s bf16 weights (that would make g == 0)."""
    model = tiny_llama()
    blocks = partition(model)
    ids = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probe = zo_probe(lambda: lm_loss(model, ids), blocks, 3, 1e-2, ZSource())
    assert probe.loss_plus.dtype == torch.float32
    assert probe.projected_grad != 0.0
    ref = two_point_estimate(lambda: lm_loss(model, ids), blocks, 3, 1e-2, ZSource())
    assert abs(probe.projected_grad - ref.projected_grad) < 0.25 * abs(ref.projected_grad) + 0.05


def test_zo_forward_runs_bf16_autocast_without_its_weight_cache():
    """A cached cast would keep a bf16 copy of every weight for the whole forward (2.3x inference's memory)."""
    model = tiny_llama()
    blocks = partition(model)
    ids = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(0))
    seen = []

    def loss_fn() -> torch.Tensor:
        seen.append(
            (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), torch.is_autocast_cache_enabled())
        )
        return lm_loss(model, ids)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        zo_probe(loss_fn, blocks, 3, 1e-2, ZSource())
        assert torch.is_autocast_cache_enabled()  # the caller's autocast is left as it was
    assert seen == [(True, torch.bfloat16, False)] * 2
    zo_probe(loss_fn, blocks, 3, 1e-2, ZSource())  # no autocast: the forward runs as called
    assert seen[-1][0] is False
