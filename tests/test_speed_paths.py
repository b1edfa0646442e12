"""The speed paths give the plain path's parameters (fp32, fixed seed), and the bench's reference loop is MeZO.

Speed paths: z drawn on worker threads ahead of the consumer (``ZSource(workers>1)``), the cached-z mode
(``cache=True``, one generation per step), the fused restore-and-update, left padding with the LM head at the
candidate positions only (tests/test_scoring.py). The plain path: z drawn chunk by chunk on the caller's
thread, and MeZO's four passes (perturb, perturb, restore, update) with no fusion. No timing here: speed is
the benchmark's business (`l2zo bench`, BENCHMARKS.md).
"""

from __future__ import annotations

import copy
import pickle
import random

import pytest
import torch

from l2zo.bench.reference import mezo_reference_step
from l2zo.engine import ZSource, partition, two_point_estimate
from l2zo.engine.seeding import Z_CHUNK
from l2zo.optim import MeZO, build_optimizer
from tests.helpers import Quadratic, lm_loss, tiny_llama


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(seed))


class _Mixed(torch.nn.Module):
    """Blocks spanning several z chunks next to blocks drawn inline (below the thread hand-off size)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.big = torch.nn.Parameter(torch.randn(2 * Z_CHUNK + 12_345, generator=g))
        self.small = torch.nn.Parameter(torch.randn(7, 5, generator=g))
        self.mid = torch.nn.Parameter(torch.randn(300, 301, generator=g))


@pytest.mark.parametrize("workers", [2, 3])
def test_threaded_stream_is_the_sequential_z_bit_for_bit(workers: int) -> None:
    blocks = partition(_Mixed())
    seq, par = ZSource(workers=1), ZSource(workers=workers)
    got = [(b.index, s, e, z.clone()) for b, s, e, z in par.stream(blocks, 1234)]
    assert [(i, s, e) for i, s, e, _ in got] == [(b.index, s, e) for b in blocks
                                                  for s, e, _ in seq.chunks(b.param, 1234, b.index)]  # fmt: skip
    for b in blocks:
        full = torch.cat([z for i, _, _, z in got if i == b.index])
        assert torch.equal(full, seq.full(b.param, 1234, b.index).view(-1))


def test_the_z_ring_is_released_when_a_pass_ends() -> None:
    """The chunk buffers exist only during a pass, so they never add to a forward's peak memory."""
    blocks = partition(_Mixed())
    par = ZSource(workers=2)
    seen = 0
    for _ in par.stream(blocks, 7):
        seen += 1
    assert seen > 3 and not any(par._ring.values())
    it = par.stream(blocks, 8)
    next(it)
    it.close()  # abandoned mid-pass: released too
    assert not any(par._ring.values())


def test_an_abandoned_stream_leaves_the_next_one_correct() -> None:
    blocks = partition(_Mixed())
    par = ZSource(workers=2)
    it = par.stream(blocks, 5)
    next(it)
    it.close()  # e.g. an exception in the consumer
    again = {b.index: [] for b in blocks}
    for b, _, _, z in par.stream(blocks, 6):
        again[b.index].append(z.clone())
    for b in blocks:
        assert torch.equal(torch.cat(again[b.index]), ZSource(workers=1).full(b.param, 6, b.index).view(-1))


def _run(name: str, workers: int, cache: bool, steps: int = 3, **hp) -> list[torch.Tensor]:
    model = tiny_llama()
    ids = _ids()
    opt = build_optimizer(name, model, **hp)
    opt.set_z_source(workers=workers, cache=cache)
    for _ in range(steps):
        opt.step(lambda: lm_loss(model, ids))
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name,hp", [("mezo", {"lr": 1e-2, "weight_decay": 0.1}), ("learned-random", {"lr": 1e-2}),
                                     ("zo-adam", {"lr": 1e-3}), ("hizoo", {"lr": 1e-2})])  # fmt: skip
def test_every_speed_path_gives_the_plain_paths_parameters_bit_for_bit(name: str, hp: dict) -> None:
    plain = _run(name, workers=1, cache=False, **hp)
    for workers, cache in ((2, False), (1, True), (2, True)):
        fast = _run(name, workers=workers, cache=cache, **hp)
        for a, b in zip(plain, fast, strict=True):
            assert torch.equal(a, b), (name, workers, cache)


def test_fused_step_matches_the_unfused_four_pass_step_to_float_rounding() -> None:
    """MeZO's fused restore+update against perturb(+), perturb(-2), restore, then update: the same algorithm;
    the fused pass rounds once where the plain one rounds twice, so they agree to a few ulps, not bit for bit."""
    fast_model, plain_model = tiny_llama(), tiny_llama()
    ids = _ids()
    opt = MeZO(fast_model, lr=1e-2, eps=1e-3, seed=3)
    opt.set_z_source(workers=2, cache=True)
    blocks, zs = partition(plain_model), ZSource(workers=1)
    for t in range(3):
        opt.step(lambda: lm_loss(fast_model, ids))
        probe = two_point_estimate(lambda: lm_loss(plain_model, ids), blocks, opt.step_seed(t), 1e-3, zs)
        assert probe.projected_grad == pytest.approx(opt.last_probe.projected_grad, rel=1e-3, abs=1e-4)
        with torch.no_grad():
            for b in blocks:  # the update as a separate (fourth) pass
                b.param.add_(zs.full(b.param, probe.seed, b.index), alpha=-1e-2 * opt.last_probe.projected_grad)
    for a, b in zip(fast_model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-6)


def test_zsource_copies_and_pickles_without_its_threads() -> None:
    zs = ZSource(workers=2, cache=True)
    blocks = partition(_Mixed())
    list(zs.stream(blocks, 1))
    for clone in (copy.deepcopy(zs), pickle.loads(pickle.dumps(zs))):
        assert clone.workers == 2 and clone.cache
        b = blocks[2]
        got = torch.cat([z.clone() for blk, _, _, z in clone.stream([b], 1)])
        assert torch.equal(got, ZSource(workers=1).full(b.param, 1, b.index).view(-1))


def test_reference_loop_is_mezo_with_the_global_rng() -> None:
    """The bench's yardstick: theta <- theta - lr * g * z, z = normal draws after torch.manual_seed(seed)."""
    q = Quadratic(seed=2)
    theta0 = [p.detach().clone() for p in q.parameters()]
    lr, eps = 0.05, 1e-3
    seed = random.Random(7).randint(0, 1_000_000_000)
    loss_plus = mezo_reference_step(q, q.loss, lr=lr, eps=eps, rng=random.Random(7))
    torch.manual_seed(seed)
    z = [torch.normal(0.0, 1.0, size=t.shape) for t in theta0]
    with torch.no_grad():
        lp = Quadratic(seed=2)
        for p, t, zi in zip(lp.parameters(), theta0, z, strict=True):
            p.copy_(t + eps * zi)
        lm = Quadratic(seed=2)
        for p, t, zi in zip(lm.parameters(), theta0, z, strict=True):
            p.copy_(t - eps * zi)
        g = float((lp.loss() - lm.loss()) / (2 * eps))
        lp_value = float(lp.loss())
    assert loss_plus == pytest.approx(lp_value, rel=1e-5)
    for p, t, zi in zip(q.parameters(), theta0, z, strict=True):
        torch.testing.assert_close(p.detach(), t - lr * g * zi, rtol=0, atol=1e-5)
