"""The rows ``l2zo bench`` times: one forward, each optimizer's step, and MeZO's reference loop.

Every row is a zero-argument call on the shared workload. Optimizers use lr 1e-7, so a few hundred timed
steps leave the model where it was (timing does not depend on the weights' values).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from l2zo.bench.config import INFERENCE, NOTES, REFERENCE, BenchConfig, split_row
from l2zo.bench.reference import mezo_reference_step
from l2zo.bench.workload import Workload, default_artifact
from l2zo.config import ZArgs
from l2zo.engine import ZSource, axpby_z_, partition
from l2zo.errors import L2ZOError
from l2zo.optim import build_optimizer, get_optimizer_spec
from l2zo.optim.z_options import apply_z_args

BENCH_LR = 1e-7
CACHED = "mezo+cache-z"
Z_PATHS = ("mezo+table", "mezo+table+two-pass", "learned+table")
Z_PASS = "z-pass"  # profile rows: one regeneration pass over all blocks, theta += 1e-12 * z
Z_PASS_1 = "z-pass-1thread"
Z_PASS_TABLE = "z-pass-table"


@dataclass
class Row:
    """name: the row label; kind: forward, zo, first-order or reference; call: one timed unit of work."""

    name: str
    kind: str
    call: Callable[[], None]
    note: str = ""


def row_names(cfg: BenchConfig) -> list[str]:
    names = [INFERENCE, *cfg.optimizers]
    if cfg.cache_z:
        names.append(CACHED)
    if cfg.z_paths:
        names += [n for n in Z_PATHS if split_row(n)[0] in cfg.optimizers and n not in names]
    if cfg.reference:
        names.append(REFERENCE)
    if cfg.profile:
        names += [Z_PASS, Z_PASS_1] + ([Z_PASS_TABLE] if cfg.z_paths else [])
    return names


def build_row(name: str, cfg: BenchConfig, wl: Workload) -> Row:
    """Construct one row (and its optimizer, whose state the first call allocates)."""
    model = wl.loaded.model
    if name == INFERENCE:

        def forward() -> None:
            with torch.inference_mode(), wl.autocast():
                wl.loss()

        return Row(name, "forward", forward)
    if name in (Z_PASS, Z_PASS_1, Z_PASS_TABLE):
        blocks = partition(model)
        zsrc = (
            ZSource(workers=1)
            if name == Z_PASS_1
            else ZArgs(z_source="table").make_source()
            if name == Z_PASS_TABLE
            else ZSource()
        )
        coef = [1e-12] * len(blocks)

        def z_pass() -> None:
            axpby_z_(blocks, random.getrandbits(62), zsrc, coef)

        what = "one pass adding windows of the noise table" if zsrc.table is not None else (
            f"one regeneration pass, {zsrc.workers} thread(s) drawing z")  # fmt: skip
        return Row(name, "profile", z_pass, what)
    if name == REFERENCE:
        rng = random.Random(0)

        def reference() -> None:
            with wl.autocast():
                mezo_reference_step(model, wl.loss, lr=BENCH_LR, rng=rng)

        return Row(name, "reference", reference, "MeZO's published loop: 4 regenerations, out of place, global RNG")
    opt_name, zo = split_row(name)
    note, kwargs = "; ".join(NOTES[v] for v in name.split("+")[1:]), {}
    if opt_name == "learned":
        artifact = cfg.artifact or default_artifact(cfg.model)
        if artifact is None:
            opt_name = "learned-random"
            note = "; ".join(x for x in ("no artifact for this model: a fresh net (the same cost)", note) if x)
        else:
            kwargs["artifact"] = str(artifact)
    opt = build_optimizer(opt_name, model, lr=BENCH_LR, **kwargs)
    ignored = apply_z_args(opt, zo)
    if ignored:
        raise L2ZOError(f"bench row {name!r}: {ignored[0]}")
    if get_optimizer_spec(opt_name).zeroth_order:

        def zo_step() -> None:
            with wl.autocast():
                opt.step(wl.loss)

        return Row(name, "zo", zo_step, note)

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=False)
        with torch.enable_grad(), wl.autocast():
            loss = wl.loss()
        loss.backward()
        return loss

    def fo_step() -> None:
        opt.step(closure)

    return Row(name, "first-order", fo_step, note)
