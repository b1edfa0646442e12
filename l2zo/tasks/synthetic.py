"""Synthetic classification tasks over the tiny world (``l2zo.synthetic.world``), named ``synth-*``.

Each task samples examples from a seeded generator; ``data_dir`` is ignored. Prompts follow MeZO's
templates (a sentence then "It was" -> " terrible"/" great"; a question then "Yes or No?\\n" ->
"No"/"Yes"). The pretraining corpus states the underlying facts declaratively ("bananas are
yellow.") but never in these prompt formats, so the tasks are learnable without being pre-solved.

Splits are disjoint by prompt: examples are drawn from one stream, duplicates of an earlier prompt are
skipped, and the stream is cut into train, dev and test. Labels are balanced in expectation (each
sampler draws the label first).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from l2zo.synthetic.world import (
    CATEGORIES,
    COLOURS,
    NAMES,
    NEGATIVE,
    NOUNS,
    POSITIVE,
    REVIEW_SUBJECTS,
    Noun,
    number_word,
    sentence_case,
)
from l2zo.tasks.base import Example, SplitSizes, Task, TaskData, register_task

# A sampler draws one example from the task's (large, finite) example space.
Sampler = Callable[[random.Random], Example]

YES_NO = ("No", "Yes")


@dataclass
class SynthTask:
    """A ``synth-*`` task: a sampler plus the Task protocol's attributes."""

    name: str
    description: str
    sampler: Sampler
    held_out: bool
    loss_kind: str = "classification"
    default_dev: int = 500

    @property
    def default_sizes(self) -> SplitSizes:
        return SplitSizes(train=1000, dev=self.default_dev, test=1000)

    def load(self, data_dir: Path | None, sizes: SplitSizes, seed: int) -> TaskData:
        """Sample disjoint train/dev/test splits; deterministic in ``(name, seed)``."""
        del data_dir  # generated, not read
        rng = random.Random(f"{self.name}:{seed}")
        wanted = sizes.train + sizes.dev + sizes.test
        seen: set[str] = set()
        stream: list[Example] = []
        misses = 0
        # The example spaces hold several thousand prompts; a long run of repeats means the space is
        # (nearly) exhausted, and stops an impossible request (say 10^6 examples) from looping forever.
        while len(stream) < wanted and misses < 2000:
            ex = self.sampler(rng)
            ex = Example(sentence_case(ex.prompt), ex.candidates, ex.label)  # same casing as the corpora
            if ex.prompt in seen:
                misses += 1
                continue
            misses = 0
            seen.add(ex.prompt)
            stream.append(ex)
        notes = [f"generated from the tiny world with seed {seed}; splits are disjoint by prompt"]
        if len(stream) < wanted:
            notes.append(f"example space exhausted: {len(stream)} unique prompts of {wanted} requested")
        n_train = min(sizes.train, len(stream))
        n_dev = min(sizes.dev, len(stream) - n_train)
        return TaskData(
            train=stream[:n_train],
            dev=stream[n_train : n_train + n_dev],
            test=stream[n_train + n_dev : n_train + n_dev + sizes.test],
            source=f"synthetic:{self.name}",
            notes=notes,
        )


def _art(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _some(rng: random.Random, noun: Noun) -> tuple[str, bool]:
    """A noun phrase with a random count: ("three lemons", True) or ("a lemon", False)."""
    n = rng.randint(1, 20)
    return (f"{number_word(n)} {noun.plural}", True) if n > 1 else (f"{_art(noun.word)} {noun.word}", False)


def _about(rng: random.Random, noun: Noun) -> str:
    """A context sentence that introduces ``noun`` without stating any of its properties."""
    phrase, _ = _some(rng, noun)
    verb = rng.choice(["found", "saw", "drew", "wanted"])
    return f"{rng.choice(NAMES)} {verb} {phrase}."


def _sentiment(rng: random.Random) -> Example:
    label = rng.randrange(2)
    a1, a2 = rng.sample(POSITIVE if label else NEGATIVE, 2)
    subject = rng.choice(REVIEW_SUBJECTS)
    text = rng.choice([f"the {subject} was {a1} and {a2}.", f"a {a1}, {a2} {subject}.", f"i found the {subject} {a1}."])
    return Example(f"{text} It was", (" terrible", " great"), label)


_CAT4 = ("animal", "fruit", "tool", "place")


def _category(rng: random.Random) -> Example:
    label = rng.randrange(len(_CAT4))
    noun = rng.choice([n for n in NOUNS if n.category == _CAT4[label]])
    if rng.random() < 0.3:
        prompt = f"{_art(noun.word)} {noun.word} is a kind of"
    else:
        prompt = f"{_about(rng, noun)} The {noun.word} is a kind of"
    return Example(prompt, tuple(f" {c}" for c in _CAT4), label)


def _colour(rng: random.Random) -> Example:
    label = rng.randrange(len(COLOURS))
    noun = rng.choice([n for n in NOUNS if n.colour == COLOURS[label]])
    phrase, _ = _some(rng, noun)
    name = rng.choice(NAMES)
    # The corpus's own phrasings: `tiny` knows every colour this way (zero-shot 1.0); `tiny-derived`,
    # trained on other text, has half forgotten them (0.5). Fine-tuning the derivative on this task
    # is the "recover what the base model knew" case, which ZO can learn within a few hundred steps.
    if rng.random() < 0.5:
        prompt = f"{name} has {phrase}. The colour of the {noun.word} is"
    else:
        prompt = f"{name} has {phrase}. {noun.plural.capitalize()} are"
    return Example(prompt, tuple(f" {c}" for c in COLOURS), label)


def _size(rng: random.Random) -> Example:
    label = rng.randrange(2)
    noun = rng.choice([n for n in NOUNS if n.size == ("small", "big")[label]])
    return Example(f"{_about(rng, noun)} Is the {noun.word} big or small? It is", (" small", " big"), label)


def _parity(rng: random.Random) -> Example:
    label = rng.randrange(2)
    n = rng.choice([k for k in range(2, 21) if k % 2 == label])  # 2..20: "n things" needs a plural
    if rng.random() < 0.2:
        prompt = f"Is {number_word(n)} even or odd? It is"
    else:
        noun = rng.choice(NOUNS)
        prompt = f"{rng.choice(NAMES)} has {number_word(n)} {noun.plural}. Is that number even or odd? It is"
    return Example(prompt, (" even", " odd"), label)


def _compare(rng: random.Random) -> Example:
    label = rng.randrange(2)
    x, y = rng.sample(range(1, 21), 2)
    more = (x > y) == bool(label)  # ask "more" when that makes the answer match the label
    relation = "more" if more else "less"
    if rng.random() < 0.5:
        prompt = f"{number_word(x)} is {relation} than {number_word(y)}? Yes or No?\n"
    else:
        a, b = rng.sample(NAMES, 2)
        noun = rng.choice(NOUNS)
        prompt = (
            f"{a} has {number_word(x)} {noun.plural if x > 1 else noun.word} and {b} has {number_word(y)}."
            f" {a} has {relation}? Yes or No?\n"
        )
    return Example(prompt, YES_NO, label)


def _negation(rng: random.Random) -> Example:
    label = rng.randrange(2)  # 1: the statement is true
    negated = rng.random() < 0.5
    noun = rng.choice(NOUNS)
    holds = label != negated  # the positive claim must hold iff (true XOR negated)
    kind = rng.randrange(3)
    if kind == 0:
        value = noun.category if holds else rng.choice([c for c in CATEGORIES if c != noun.category])
        claim = f"{_art(value)} {value}"
    elif kind == 1:
        claim = noun.colour if holds else rng.choice([c for c in COLOURS if c != noun.colour])
    else:
        claim = noun.size if holds else ("big" if noun.size == "small" else "small")
    statement = f"the {noun.word} is {'not ' if negated else ''}{claim}"
    if rng.random() < 0.5:
        statement = f"{rng.choice(NAMES)} says {statement}"
    return Example(f"{statement}. True or False?\n", ("False", "True"), label)


def _successor(rng: random.Random) -> Example:
    x = rng.randint(1, 19)
    # Four candidates per example (the answer among three other number words), shuffled: the label is the
    # answer's position, so a fixed prior over positions gains nothing and the model must know the order.
    options = [x + 1, *rng.sample([k for k in range(1, 21) if k not in (x, x + 1)], 3)]
    rng.shuffle(options)
    # The corpus-(a) phrasing "after seven comes eight."; `tiny` knows it (zero-shot 1.0), `tiny-derived`, trained
    # on stories without it, has partly forgotten it (0.66): another "recover what the base knew" task.
    if rng.random() < 0.2:
        prompt = f"after {number_word(x)} comes"
    else:
        noun = rng.choice(NOUNS)
        prompt = f"{rng.choice(NAMES)} counted the {noun.plural}. After {number_word(x)} comes"
    return Example(prompt, tuple(f" {number_word(k)}" for k in options), options.index(x + 1))


# name -> (description, sampler, held_out). Held-out tasks are never seen by meta-training.
_SPECS: dict[str, tuple[str, Sampler, bool]] = {
    "synth-sentiment": ("tiny world: review polarity, 'It was' -> terrible/great", _sentiment, False),
    "synth-category": ("tiny world: noun category, 'is a kind of' -> animal/fruit/tool/place", _category, False),
    "synth-size": ("tiny world: is the thing big or small", _size, False),
    "synth-parity": ("tiny world: is a number word even or odd", _parity, False),
    "synth-compare": ("tiny world: 'x is more than y? Yes or No?'", _compare, False),
    "synth-color": ("tiny world (held out): colour of a thing, in the corpus phrasing", _colour, True),
    "synth-negation": ("tiny world (held out): is a possibly negated fact true or false", _negation, True),
    "synth-successor": ("tiny world (held out): the number word after x, among four", _successor, True),
}

SYNTH_META_TRAIN: tuple[str, ...] = tuple(n for n, (_, _, held) in _SPECS.items() if not held)
SYNTH_HELD_OUT: tuple[str, ...] = tuple(n for n, (_, _, held) in _SPECS.items() if held)


def synth_tasks() -> dict[str, SynthTask]:
    """All ``synth-*`` tasks by name, without going through the registry (which also loads GLUE)."""
    return {name: SynthTask(name, desc, sampler, held) for name, (desc, sampler, held) in _SPECS.items()}


def _register(name: str, description: str, sampler: Sampler, held_out: bool) -> None:
    @register_task(name, description)
    def factory() -> Task:
        return SynthTask(name, description, sampler, held_out)


for _name, (_desc, _sampler, _held) in _SPECS.items():
    _register(_name, _desc, _sampler, _held)

__all__ = ["SYNTH_HELD_OUT", "SYNTH_META_TRAIN", "SynthTask", "synth_tasks"]
