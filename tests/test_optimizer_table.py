"""The shared optimizer table (optax ``alias_test`` style): every registered optimizer, same checks.

Parametrised over ``optimizer_specs()``, so an optimizer registered later is covered without editing
this file. For each: the spec is well formed and builds from its defaults; a few steps on a tiny Llama
(bf16) keep shapes, dtypes and finiteness; ``state_dict`` survives a save/load (torch.save)
into a fresh optimizer that then takes the identical next steps, bit for bit; and the loss falls on
the Quadratic. Nothing is skipped: an optimizer the table cannot drive fails.

Per-optimizer knobs (add a row when a new optimizer needs one; the fallback covers the rest):
    TEST_HPARAMS[name]   hyperparameters for the Quadratic run (tiny-LM runs use the spec's defaults
                         with lr scaled down to keep bf16 finite).
    MIN_PROGRESS[name]   fraction of the gap L(theta_0) - L* the Quadratic run must close (default 0.5).
    BUILD_KWARGS[name]   callable(model, tmp_path) -> extra factory kwargs (e.g. an artifact folder).
Capabilities the table honours (declared on the spec, as the training loop reads them):
    ``needs_anchor_batch`` (mezo-svrg): ``set_anchor_loss_fn(fn)`` gets the full-batch loss of the problem.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from l2zo.optim.registry import OptimizerSpec, build_optimizer, optimizer_specs
from tests.helpers import Quadratic, lm_loss, tiny_llama

SPECS = optimizer_specs()
NAMES = sorted(SPECS)

TEST_HPARAMS: dict[str, dict[str, Any]] = {
    "mezo": dict(lr=0.05, eps=1e-3),
    "zo-sgd-mmt": dict(lr=0.01, eps=1e-3, momentum=0.9),
    "zo-sgd-cons": dict(lr=0.05, eps=1e-3),
    "zo-sgd-sign": dict(lr=0.01, eps=1e-3),
    "zo-adam": dict(lr=0.02, eps=1e-3),
    "hizoo": dict(lr=0.05, eps=1e-3, hessian_smooth=1e-3),
    "sparse-mezo": dict(lr=0.05, eps=1e-3, sparsity=0.5),
    "fo-sgd": dict(lr=0.1),
    "fo-adam": dict(lr=0.05),
    "forward-grad": dict(lr=0.05),
    "fzoo": dict(lr=0.02, eps=1e-3),
    "lozo": dict(lr=0.05, eps=1e-3, rank=1),
    "lozo-m": dict(lr=0.02, eps=1e-3, rank=1),
    "mezo-svrg": dict(lr=0.02, eps=1e-3, lr_full=0.02),
}
FALLBACK_HPARAMS: dict[str, Any] = dict(lr=0.02, eps=1e-3)
# Sparse MeZO never touches entries above its threshold, so it cannot close the whole gap.
MIN_PROGRESS: dict[str, float] = {"sparse-mezo": 0.1}
QUADRATIC_STEPS = 200


def _learned_artifact(model: torch.nn.Module, tmp_path: Path) -> dict[str, Any]:
    """A freshly initialised variance net saved as an artifact for ``model`` (no meta-training)."""
    from l2zo.engine import partition
    from l2zo.learned.artifact import save_artifact
    from l2zo.learned.net import NetSpec, VarianceNet

    blocks = partition(model)
    net = VarianceNet(NetSpec(), [b.name for b in blocks], seed=0)
    path = save_artifact(
        tmp_path / "artifact", net, blocks, base_model={"name": "table-test"}, meta_config={},
        meta_record={}, normalization={"rule": "numel", "batch_size": 16}, overwrite=True,
    )  # fmt: skip
    return {"artifact": str(path)}


def _sigma_file(model: torch.nn.Module, tmp_path: Path) -> dict[str, Any]:
    """A fixed-sigma file for ``model``: sigma 0.5, 1, 1.5, ... over its blocks (normalised by the optimizer)."""
    import json

    from l2zo.engine import partition

    path = tmp_path / "sigma.json"
    path.write_text(json.dumps({b.name: 0.5 * (1 + b.index % 3) for b in partition(model)}))
    return {"sigma_file": str(path)}


BUILD_KWARGS: dict[str, Callable[[torch.nn.Module, Path], dict[str, Any]]] = {
    "learned": _learned_artifact,
    "fixed-sigma": _sigma_file,
}


# -- driving any registered optimizer ---------------------------------------------------------------
def _hparams(spec: OptimizerSpec, base: dict[str, Any]) -> dict[str, Any]:
    allowed = set(spec.hyperparameters())
    return {k: v for k, v in base.items() if k in allowed}


def _build(name: str, model: torch.nn.Module, tmp_path: Path, hp: dict[str, Any], seed: int = 3):
    spec = SPECS[name]
    kw = dict(hp)
    if "seed" in spec.hyperparameters():
        kw["seed"] = seed
    if name in BUILD_KWARGS:
        kw.update(BUILD_KWARGS[name](model, tmp_path))
    return build_optimizer(name, model, **kw)


def _closure(spec: OptimizerSpec, opt: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor]):
    """ZO: the loss. First order: zero grads, loss, backward (as l2zo.train.module does)."""
    if spec.zeroth_order:
        return loss_fn

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return loss

    return closure


def _prepare(spec: OptimizerSpec, opt: torch.optim.Optimizer, full_loss: Callable[[], torch.Tensor]) -> None:
    if spec.needs_anchor_batch:
        opt.set_anchor_loss_fn(full_loss)


def _step(spec: OptimizerSpec, opt: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    if spec.zeroth_order:
        return opt.step(_closure(spec, opt, loss_fn))
    with torch.enable_grad():
        return opt.step(_closure(spec, opt, loss_fn))


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(seed))


_LM_CACHE: dict[torch.dtype, torch.nn.Module] = {}


def _lm(dtype: torch.dtype) -> torch.nn.Module:
    """A fresh copy of a 1-layer tiny Llama (built once: constructing it costs more than copying it)."""
    if dtype not in _LM_CACHE:
        _LM_CACHE[dtype] = tiny_llama(layers=1).to(dtype)
    return copy.deepcopy(_LM_CACHE[dtype])


def _lm_hparams(spec: OptimizerSpec) -> dict[str, Any]:
    hp = dict(spec.defaults)
    if "lr" in hp:
        hp["lr"] = min(float(hp["lr"]), 1e-4)
    return hp


# -- the table --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_spec_is_well_formed(name: str, tmp_path: Path):
    spec = SPECS[name]
    assert spec.name == name
    assert spec.description.strip() and "\n" not in spec.description, "one-line description for `l2zo optimizers`"
    assert isinstance(spec.forwards_per_step, int) and spec.forwards_per_step >= 1
    unknown = set(spec.defaults) - set(spec.hyperparameters())
    assert not unknown, f"defaults name non-hyperparameters: {unknown}"
    opt = _build(name, Quadratic(), tmp_path, {})
    assert isinstance(opt, torch.optim.Optimizer)
    for key, value in spec.defaults.items():  # defaults reach the param groups or the optimizer
        if key in opt.param_groups[0] and not isinstance(value, (tuple, list)):
            assert opt.param_groups[0][key] == pytest.approx(value), key


@pytest.mark.parametrize("name", NAMES)
def test_smoke_on_tiny_llama_bf16(name: str, tmp_path: Path):
    """bf16 weights: shapes and dtypes unchanged, weights and state finite, a finite scalar loss returned."""
    spec = SPECS[name]
    model = _lm(torch.bfloat16)
    before = {n: (p.shape, p.dtype) for n, p in model.named_parameters()}
    opt = _build(name, model, tmp_path, _lm_hparams(spec))
    ids = _ids()
    _prepare(spec, opt, lambda: lm_loss(model, _ids(1)))
    for _ in range(2):
        loss = _step(spec, opt, lambda: lm_loss(model, ids))
        assert isinstance(loss, torch.Tensor) and loss.numel() == 1 and math.isfinite(float(loss.detach()))
    for n, p in model.named_parameters():
        assert (p.shape, p.dtype) == before[n], n
        assert torch.isfinite(p).all(), n
    for st in opt.state.values():
        for key, value in st.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert torch.isfinite(value).all(), key


def _bf16_quadratic() -> Quadratic:
    """The Quadratic with bf16 weights (its coefficients stay fp32): catches fp32 state cast to bf16 on load."""
    return Quadratic(seed=2).to(torch.bfloat16)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_is_bit_exact(name: str, tmp_path: Path):
    """Save after 3 steps (torch.save), load into a fresh optimizer on a copy: the next 3 steps match bit for bit."""
    spec = SPECS[name]
    a, b = _bf16_quadratic(), _bf16_quadratic()
    hp = _hparams(spec, TEST_HPARAMS.get(name, FALLBACK_HPARAMS))
    opt_a = _build(name, a, tmp_path, hp, seed=3)
    _prepare(spec, opt_a, a.loss)
    for _ in range(3):
        _step(spec, opt_a, a.loss)
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    with torch.no_grad():
        for pa, pb in zip(a.parameters(), b.parameters()):
            pb.copy_(pa)
    opt_b = _build(name, b, tmp_path, hp, seed=11)  # another seed: the state must carry it
    _prepare(spec, opt_b, b.loss)
    opt_b.load_state_dict(torch.load(buf, weights_only=False))
    for pa, pb in zip(a.parameters(), b.parameters()):  # loaded state keeps its own dtype (fp32 moments)
        for key, va in opt_a.state.get(pa, {}).items():
            vb = opt_b.state[pb][key]
            if isinstance(va, torch.Tensor):
                assert vb.dtype == va.dtype and torch.equal(va, vb), key
    for _ in range(3):
        la = _step(spec, opt_a, a.loss)
        lb = _step(spec, opt_b, b.loss)
        assert torch.equal(la.detach(), lb.detach())
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n


@pytest.mark.parametrize("name", NAMES)
def test_loss_falls_on_quadratic(name: str, tmp_path: Path):
    spec = SPECS[name]
    q = Quadratic(seed=1)
    hp = _hparams(spec, TEST_HPARAMS.get(name, FALLBACK_HPARAMS))
    opt = _build(name, q, tmp_path, hp)
    _prepare(spec, opt, q.loss)
    with torch.no_grad():
        start = q.loss().item()
        best = -0.5 * ((q.b_w**2 / q.a_w).sum() + (q.b_v**2 / q.a_v).sum()).item()  # L* at theta* = -b/a
    for _ in range(QUADRATIC_STEPS):
        _step(spec, opt, q.loss)
    with torch.no_grad():
        end = q.loss().item()
    need = MIN_PROGRESS.get(name, 0.5)
    assert math.isfinite(end)
    assert end < start - need * (start - best), f"{name}: loss {start:.4f} -> {end:.4f} (L* = {best:.4f})"
