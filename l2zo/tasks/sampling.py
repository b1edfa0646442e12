"""MeZO's data sampling protocol (``large_models/tasks.py::sample_subset`` and ``run.py``), on indices.

* train + dev: one draw of ``num_train + num_dev`` from the train split, ``RandomState(seed).permutation`` (the
  same stream as MeZO's ``np.random.seed(seed); np.random.permutation``); dev is the last ``num_dev``.
* test: the first ``num_test`` of a permutation of the validation split under the same seed.
* A source with only a validation split (BoolQ, MultiRC here) is first cut into disjoint test / dev / train pools
  by group (a MultiRC passage, or each record alone), then each pool is sampled with the same seed.

Functions return index arrays into the split(s) and append human-readable notes for reports.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from l2zo.errors import L2ZOError
from l2zo.tasks.base import SplitSizes


def permutation(n: int, seed: int) -> np.ndarray:
    """MeZO's shuffle: ``np.random.permutation(n)`` under ``np.random.seed(seed)``. [n] int64."""
    return np.random.RandomState(seed).permutation(n)


def sample(n: int, num: int, seed: int) -> np.ndarray:
    """Up to ``num`` indices of ``range(n)``, MeZO-style (a seeded permutation, cut). [min(n, num)]."""
    return permutation(n, seed)[:num]


def sample_train_dev(
    n: int, num_train: int, num_dev: int, seed: int, notes: list[str], what: str = "train split"
) -> tuple[np.ndarray, np.ndarray]:
    """MeZO's train/dev draw from a train split of ``n`` records.

    When ``n < num_train + num_dev`` the dev size is kept and train shrinks (as MeZO's
    ``train_samples[-num_dev:]`` does); a note says so. Raises L2ZOError when nothing is left for train.
    """
    draw = sample(n, num_train + num_dev, seed)
    if n < num_train + num_dev:
        if num_train > 0 and n <= num_dev:
            raise L2ZOError(
                f"the {what} has {n} examples, not enough for {num_dev} dev examples plus any "
                f"training examples; lower the dev size (SplitSizes.dev) below {n}"
            )
        notes.append(
            f"the {what} has {n} examples < {num_train} train + {num_dev} dev requested: "
            f"train shrunk to {n - num_dev}, dev kept at {num_dev}"
        )
    cut = len(draw) - num_dev
    return draw[:cut], draw[cut:]


def sample_test(n: int, num_test: int, seed: int, notes: list[str], what: str = "validation split") -> np.ndarray:
    """Test = up to ``num_test`` records of the validation split, same seed as train/dev."""
    if n < num_test:
        notes.append(f"test uses all {n} examples of the {what} ({num_test} requested)")
    return sample(n, num_test, seed)


def split_pools(
    groups: Sequence[Hashable], sizes: SplitSizes, seed: int, notes: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut one split into disjoint test / dev / train pools by group, then sample each pool.

    Groups are shuffled with ``seed`` and dealt whole, first to the test pool until it holds at least
    ``sizes.test`` records, then to dev until ``sizes.dev``, the rest to train; so no group crosses pools. Each
    pool is then sampled MeZO-style (a seeded permutation, cut to the requested size).

    Args:
        groups: a group id per record, [n].
    Returns:
        (train, dev, test) index arrays into the split.
    """
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    order = list(members)
    pools: list[list[int]] = [[], [], []]  # test, dev, train
    counts = [0, 0, 0]
    targets = (sizes.test, sizes.dev)
    which = 0
    for k in permutation(len(order), seed):
        while which < 2 and counts[which] >= targets[which]:
            which += 1
        pools[which].append(k)
        counts[which] += len(members[order[k]])
    test_pool, dev_pool, train_pool = (
        np.array([i for k in p for i in members[order[k]]], dtype=np.int64) for p in pools
    )
    if sizes.train > 0 and len(train_pool) == 0:
        raise L2ZOError(
            f"only {len(groups)} records: nothing left for a train pool after {sizes.test} test and "
            f"{sizes.dev} dev; lower the test or dev size"
        )
    grouped = len(order) != len(groups)
    unit = f" ({len(order)} groups, dealt whole: {len(pools[2])} train / {len(pools[1])} dev / {len(pools[0])} test)"
    notes.append(
        f"no train split: the {len(groups)} validation records{unit if grouped else ''} were split with seed {seed} "
        f"into disjoint pools: train {len(train_pool)}, dev {len(dev_pool)}, test {len(test_pool)}"
    )
    test = test_pool[sample(len(test_pool), sizes.test, seed)]
    dev = dev_pool[sample(len(dev_pool), sizes.dev, seed)]
    train = train_pool[sample(len(train_pool), sizes.train, seed)]
    for name, got, want in (("train", len(train), sizes.train), ("dev", len(dev), sizes.dev)):
        if got < want:
            notes.append(f"{name} pool has only {got} records ({want} requested)")
    return train, dev, test
