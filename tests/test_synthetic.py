"""The tiny world and the synth-* tasks: determinism, disjoint splits, no prompt formats in the corpora."""

from __future__ import annotations

from collections import Counter

import pytest

from l2zo.synthetic.world import NOUNS, derived_corpus, pretrain_corpus
from l2zo.tasks.base import SplitSizes, Task
from l2zo.tasks.synthetic import SYNTH_HELD_OUT, SYNTH_META_TRAIN, SynthTask, synth_tasks

TASKS = synth_tasks()


def test_task_family() -> None:
    assert len(TASKS) >= 6
    assert all(name.startswith("synth-") for name in TASKS)
    assert not set(SYNTH_META_TRAIN) & set(SYNTH_HELD_OUT)
    assert set(SYNTH_META_TRAIN) | set(SYNTH_HELD_OUT) == set(TASKS)
    assert len(SYNTH_HELD_OUT) == 3 and len(SYNTH_META_TRAIN) >= 4
    for name, task in TASKS.items():
        assert isinstance(task, Task)
        assert task.held_out == (name in SYNTH_HELD_OUT)
        assert task.loss_kind == "classification" and task.default_dev == 500


def test_registered() -> None:
    from l2zo.tasks.base import _REGISTRY

    for name in TASKS:
        assert name in _REGISTRY
        assert isinstance(_REGISTRY[name][0](), SynthTask)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_deterministic_disjoint_balanced(name: str) -> None:
    task = TASKS[name]
    data = task.load(None, SplitSizes(), seed=3)
    assert (len(data.train), len(data.dev), len(data.test)) == (1000, 500, 1000), data.notes
    again = task.load("/ignored", SplitSizes(), seed=3)  # data_dir is ignored
    assert again.train == data.train and again.dev == data.dev and again.test == data.test
    assert task.load(None, SplitSizes(), seed=4).train != data.train

    prompts = [{ex.prompt for ex in split} for split in (data.train, data.dev, data.test)]
    assert sum(map(len, prompts)) == 2500  # unique within splits ...
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])  # ... and across

    n_classes = len(data.train[0].candidates)
    assert 2 <= n_classes <= 4
    if name == "synth-successor":  # per-example candidates: the answer among three other number words
        assert all(len(set(ex.candidates)) == 4 for ex in data.train + data.test)
        assert len({ex.candidates for ex in data.train}) > 100
    else:
        assert all(ex.candidates == data.train[0].candidates for ex in data.train + data.test)
    counts = Counter(ex.label for ex in data.train)
    assert set(counts) == set(range(n_classes))
    assert min(counts.values()) > 0.6 * 1000 / n_classes  # roughly balanced


def test_example_space_exhaustion_is_reported() -> None:
    data = TASKS["synth-parity"].load(None, SplitSizes(train=20_000, dev=0, test=0), seed=0)
    assert 2500 < len(data.train) < 20_000
    assert any("exhausted" in note for note in data.notes)


def test_corpora_deterministic_and_different() -> None:
    a, b = pretrain_corpus(50, seed=0), derived_corpus(50, seed=0)
    assert a == pretrain_corpus(50, seed=0) and a != pretrain_corpus(50, seed=1)
    assert b == derived_corpus(50, seed=0)
    assert sum(doc.count(" not ") for doc in b) > 3 * sum(doc.count(" not ") for doc in a)  # more negation


def test_corpora_never_use_a_task_prompt_format() -> None:
    text = " ".join(pretrain_corpus(3000)).lower()
    both = text + " ".join(derived_corpus(3000)).lower()
    for fmt in ("kind of", "yes or no", "true or false", "what colour", "even or odd", "big or small"):
        assert fmt not in both, fmt
    assert ". it was" not in text  # reviews end ", it was great." in corpus (a), never "... . It was"
    # ... yet the facts are there in declarative form.
    for noun in NOUNS[:5]:
        assert f"{noun.plural} are {noun.colour}" in text


def test_successor_answers_are_the_next_number() -> None:
    from l2zo.synthetic.world import number_word

    words = {number_word(k): k for k in range(1, 21)}
    for ex in TASKS["synth-successor"].load(None, SplitSizes(train=200, dev=0, test=0), seed=0).train:
        x = words[ex.prompt.split("fter ")[1].split(" comes")[0]]  # "After x comes" / "after x comes" (cased)
        assert words[ex.candidates[ex.label].strip()] == x + 1
