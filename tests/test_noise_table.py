"""z from a seeded noise table (l2zo/engine/noise_table.py): its statistics, its determinism, and shards. The estimator on it is tested with the other sources' (tests/test_engine.py)."""

from __future__ import annotations

import pickle

import torch

from l2zo.engine import NoiseTable, ZSource
from l2zo.engine.noise_table import WINDOW


def _table_source(size: int = 1 << 19) -> ZSource:
    return ZSource(table=NoiseTable(size))


def test_the_table_is_standardised_and_nearly_white() -> None:
    """Exactly mean 0 and variance 1 (so every entry of z has them over offsets), and a circular
    autocorrelation r(lag) within 5/sqrt(size) of 0 at every lag tested (about N(0, 1/size) each)."""
    table = NoiseTable(1 << 18)
    t = table.values(torch.device("cpu"), torch.float64)[: table.size]
    assert abs(float(t.mean())) < 1e-12 and abs(float(t.var(correction=0)) - 1) < 1e-12
    lags = torch.arange(1, 65)
    r = torch.stack([(t * torch.roll(t, -int(k))).mean() for k in lags])
    assert float(r.abs().max()) < 5 / table.size**0.5
    # The stored copy repeats the first window at the end: a window starting anywhere is one slice.
    full = table.values(torch.device("cpu"), torch.float32)
    assert torch.equal(full[table.size :], full[:WINDOW])


def test_the_same_seed_gives_the_same_z_and_others_differ() -> None:
    param = torch.empty(3 * WINDOW + 17)
    a, b = _table_source(), _table_source()
    z = a.full(param, seed=7, block_index=2)
    assert torch.equal(z, b.full(param, 7, 2))  # another source with the same table: the same z
    assert not torch.equal(z, a.full(param, 8, 2)) and not torch.equal(z, a.full(param, 7, 3))
    assert not torch.equal(z, ZSource().full(param, 7, 2))  # never the randn source's z
    z2 = pickle.loads(pickle.dumps(a)).full(param, 7, 2)  # a pickled source keeps its table
    assert torch.equal(z, z2)
    assert a.describe() == {"kind": "table", "size": 1 << 19, "table_seed": 0, "window": WINDOW}


def test_a_blocks_z_has_mean_0_and_variance_1() -> None:
    """Over a block of 2^18 entries (512 windows): |mean| < 5/sqrt(n) and |var - 1| < 5*sqrt(2/n) (the bounds of
    iid N(0,1) entries; windows of the 2^19-entry table rarely overlap), for several seeds and blocks."""
    n = 1 << 18
    src = _table_source()
    for seed, block in ((0, 0), (1, 5), (123456789, 2)):
        z = src.full(torch.empty(n), seed, block).double()
        assert abs(float(z.mean())) < 5 / n**0.5
        assert abs(float(z.var()) - 1) < 5 * (2 / n) ** 0.5


def test_a_shard_draws_its_slice_of_the_blocks_z() -> None:
    """Row shards of a block (FSDP2's spans) get exactly the slices of the unsharded z, at any boundary."""
    total = 5 * WINDOW + 123
    src = _table_source(1 << 16)
    whole = src.full(torch.empty(total), 3, 1)
    cuts = [0, 1, WINDOW - 1, 2 * WINDOW + 5, 4 * WINDOW, total]
    for lo, hi in zip(cuts, cuts[1:]):
        part = src.full(torch.empty(hi - lo), 3, 1, span=(lo, total))
        assert torch.equal(part, whole[lo:hi])


def test_z_in_bf16_is_the_fp32_z_rounded() -> None:
    src = _table_source(1 << 16)
    z32 = src.full(torch.empty(WINDOW + 5), 4, 0)
    z16 = src.full(torch.empty(WINDOW + 5, dtype=torch.bfloat16), 4, 0)
    assert torch.equal(z16, z32.to(torch.bfloat16))
