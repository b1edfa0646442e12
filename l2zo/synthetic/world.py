"""The "tiny world": a fixed toy lexicon and two seeded text generators over it.

The lexicon (nouns with a category, colour and size; adjectives with a polarity; the number words
one..twenty) is the ground truth behind the ``synth-*`` tasks (``l2zo.tasks.synthetic``). Two
corpora are generated from it:

* :func:`pretrain_corpus` (corpus a): declarative facts ("bananas are yellow.") and short reviews
  ("the show was dull and slow, it was terrible."), the text the ``tiny`` model is pretrained on;
* :func:`derived_corpus` (corpus b): short stories and dialogues with more negation, the text the
  ``tiny-derived`` model is further trained on.

The corpora state facts declaratively but never in a task's prompt format, so the tasks are
learnable (the model has seen the facts) without being pre-solved (it has not seen the format).
Everything is a pure function of its seed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

CATEGORIES: tuple[str, ...] = ("animal", "fruit", "tool", "place", "vehicle")
COLOURS: tuple[str, ...] = ("red", "yellow", "green", "brown")
SIZES: tuple[str, ...] = ("small", "big")


@dataclass(frozen=True)
class Noun:
    """A thing in the world. ``colour`` is one of COLOURS, ``size`` one of SIZES."""

    word: str
    plural: str
    category: str
    colour: str
    size: str

    @property
    def article(self) -> str:
        return "an" if self.word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Adjective:
    """A review adjective; ``positive`` is its polarity."""

    word: str
    positive: bool


def _n(word: str, plural: str, category: str, colour: str, size: str) -> Noun:
    return Noun(word, plural, category, colour, size)


# 8 nouns per category. Colours and sizes are loosely realistic, but balanced within each category
# (two of each colour, four of each size) so no category predicts a colour or a size.
NOUNS: tuple[Noun, ...] = (
    _n("cat", "cats", "animal", "brown", "small"),
    _n("mouse", "mice", "animal", "brown", "small"),
    _n("frog", "frogs", "animal", "green", "small"),
    _n("bird", "birds", "animal", "yellow", "small"),
    _n("whale", "whales", "animal", "green", "big"),
    _n("horse", "horses", "animal", "red", "big"),
    _n("lion", "lions", "animal", "yellow", "big"),
    _n("fox", "foxes", "animal", "red", "big"),
    _n("banana", "bananas", "fruit", "yellow", "small"),
    _n("cherry", "cherries", "fruit", "red", "small"),
    _n("lime", "limes", "fruit", "green", "small"),
    _n("date", "dates", "fruit", "brown", "small"),
    _n("melon", "melons", "fruit", "green", "big"),
    _n("apple", "apples", "fruit", "red", "big"),
    _n("lemon", "lemons", "fruit", "yellow", "big"),
    _n("coconut", "coconuts", "fruit", "brown", "big"),
    _n("hammer", "hammers", "tool", "brown", "small"),
    _n("chisel", "chisels", "tool", "red", "small"),
    _n("brush", "brushes", "tool", "yellow", "small"),
    _n("file", "files", "tool", "green", "small"),
    _n("axe", "axes", "tool", "red", "big"),
    _n("ladder", "ladders", "tool", "brown", "big"),
    _n("shovel", "shovels", "tool", "green", "big"),
    _n("drill", "drills", "tool", "yellow", "big"),
    _n("hut", "huts", "place", "brown", "small"),
    _n("shop", "shops", "place", "red", "small"),
    _n("garden", "gardens", "place", "green", "small"),
    _n("beach", "beaches", "place", "yellow", "small"),
    _n("forest", "forests", "place", "green", "big"),
    _n("city", "cities", "place", "red", "big"),
    _n("desert", "deserts", "place", "yellow", "big"),
    _n("farm", "farms", "place", "brown", "big"),
    _n("bike", "bikes", "vehicle", "red", "small"),
    _n("scooter", "scooters", "vehicle", "yellow", "small"),
    _n("canoe", "canoes", "vehicle", "brown", "small"),
    _n("kart", "karts", "vehicle", "green", "small"),
    _n("bus", "buses", "vehicle", "yellow", "big"),
    _n("truck", "trucks", "vehicle", "red", "big"),
    _n("tractor", "tractors", "vehicle", "green", "big"),
    _n("ship", "ships", "vehicle", "brown", "big"),
)

POSITIVE: tuple[str, ...] = (
    "wonderful", "bright", "warm", "fun", "lovely", "clever", "funny", "charming", "brilliant",
    "sweet", "moving", "fresh", "gripping", "beautiful", "superb",
)  # fmt: skip
NEGATIVE: tuple[str, ...] = (
    "dull", "slow", "awful", "boring", "bland", "silly", "messy", "stale", "painful", "ugly",
    "weak", "tedious", "clumsy", "cold", "dreadful",
)  # fmt: skip
ADJECTIVES: tuple[Adjective, ...] = tuple(Adjective(w, True) for w in POSITIVE) + tuple(
    Adjective(w, False) for w in NEGATIVE
)
REVIEW_SUBJECTS: tuple[str, ...] = ("film", "show", "book", "song", "meal", "game", "play", "trip", "class", "party")

NUMBER_WORDS: tuple[str, ...] = (
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
)  # fmt: skip

NAMES: tuple[str, ...] = ("Tom", "Ann", "Sam", "Lily", "Max", "Eva", "Ben", "Zoe")


def number_word(n: int) -> str:
    """The word for ``n`` in 1..20."""
    return NUMBER_WORDS[n - 1]


def nouns_in(category: str) -> tuple[Noun, ...]:
    return tuple(n for n in NOUNS if n.category == category)


_SENTENCE_START = re.compile(r'(^|[.!?]\s+"?|^")([a-z])')


def sentence_case(text: str) -> str:
    """Capitalise sentence starts and the pronoun "i", as in ordinary English text."""
    text = _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), text)
    return re.sub(r"\bi\b", "I", text)


# ---- corpus (a): declarative facts and short reviews --------------------------------------------


def _fact_sentence(rng: random.Random) -> str:
    # Each property has its own phrasing, so the context right before a fact word fixes which
    # property comes next ("bananas are" -> a colour, "a banana is a" -> a category): the model
    # then only has to learn noun -> value, which a tiny model picks up in a few hundred steps.
    noun = rng.choice(NOUNS)
    a, w, p = noun.article, noun.word, noun.plural
    cat = f"{'an' if noun.category == 'animal' else 'a'} {noun.category}"
    kind = rng.randrange(3)
    if kind == 0:
        return rng.choice([f"{a} {w} is {cat}.", f"the {w} is {cat}.", f"{p} and other {noun.category}s."])
    if kind == 1:
        return rng.choice([f"{p} are {noun.colour}.", f"the colour of the {w} is {noun.colour}.",
                           f"the {w} was {noun.colour} as always."])  # fmt: skip
    return rng.choice([f"{a} {w} is {noun.size}.", f"the {w} was very {noun.size}."])


def _number_sentence(rng: random.Random) -> str:
    x, y = rng.sample(range(1, 21), 2)
    kind = rng.randrange(4)
    if kind == 0:
        return f"{number_word(x)} is {'even' if x % 2 == 0 else 'odd'}."
    if kind == 1:
        return f"{number_word(max(x, y))} is more than {number_word(min(x, y))}."
    if kind == 2:
        return f"{number_word(min(x, y))} is less than {number_word(max(x, y))}."
    return f"after {number_word(min(x, 19))} comes {number_word(min(x, 19) + 1)}."


def _review_sentence(rng: random.Random) -> str:
    positive = rng.random() < 0.5
    pool = POSITIVE if positive else NEGATIVE
    a1, a2 = rng.sample(pool, 2)
    subject = rng.choice(REVIEW_SUBJECTS)
    verdict = ("great" if positive else "terrible") if rng.random() < 0.7 else ("good" if positive else "bad")
    return rng.choice([f"the {subject} was {a1} and {a2}, it was {verdict}.",
                       f"what a {a1} {subject}. i {'loved' if positive else 'hated'} it.",
                       f"the {subject} felt {a1}, so it was {verdict}."])  # fmt: skip


def _scene_sentence(rng: random.Random) -> str:
    name, noun, place = rng.choice(NAMES), rng.choice(NOUNS), rng.choice(nouns_in("place"))
    return rng.choice(
        [
            f"{name} saw {noun.article} {noun.word} near the {place.word}.",
            f"{name} went to the {place.word} with {noun.article} {noun.word}.",
        ]
    )


def pretrain_document(rng: random.Random) -> str:
    """One corpus-(a) document: 3-6 capitalised sentences mixing facts, numbers, reviews and scenes."""
    makers = (_fact_sentence, _fact_sentence, _fact_sentence, _number_sentence, _review_sentence,
              _review_sentence, _scene_sentence)  # fmt: skip
    return sentence_case(" ".join(rng.choice(makers)(rng) for _ in range(rng.randint(3, 6))))


# ---- corpus (b): stories and dialogues with negation ---------------------------------------------


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _negated_fact(rng: random.Random, name: str) -> str:
    noun = rng.choice(NOUNS)
    wrong_colour = rng.choice([c for c in COLOURS if c != noun.colour])
    other_size = "big" if noun.size == "small" else "small"
    wrong_cat = rng.choice([c for c in CATEGORIES if c != noun.category])
    return rng.choice([
        f'"is the {noun.word} {wrong_colour}?" asked {name}. "no, it is not {wrong_colour}. it is {noun.colour}."',
        f"the {noun.word} was not {other_size}. it was {noun.size}, like all {noun.plural}.",
        f"{name} said the {noun.word} was {_a(wrong_cat)} {wrong_cat}, but it was not."
        f" it was {_a(noun.category)} {noun.category}.",
        f"{noun.plural} are not {wrong_colour}, and they are never {other_size}.",
    ])  # fmt: skip


def _story_review(rng: random.Random, name: str) -> str:
    positive = rng.random() < 0.5
    adj = rng.choice(POSITIVE if positive else NEGATIVE)
    opposite = rng.choice(NEGATIVE if positive else POSITIVE)
    subject = rng.choice(REVIEW_SUBJECTS)
    return rng.choice([
        f"after the {subject}, {name} smiled. it was not {opposite} at all. it was {adj}." if positive
        else f"after the {subject}, {name} sighed. it was not {opposite} at all. it was {adj}.",
        f'"did you like the {subject}?" "{"yes" if positive else "no"}, it was {adj}."',
    ])  # fmt: skip


def _story_numbers(rng: random.Random, name: str) -> str:
    x, y = sorted(rng.sample(range(1, 21), 2))
    wx, wy = number_word(x), number_word(y)
    noun = rng.choice(NOUNS)
    return rng.choice([
        f"{name} had {wx} {noun.plural if x > 1 else noun.word}, not {wy}. {wx} is not more than {wy}.",
        f"{name} counted to {number_word(y)}. {number_word(y)} is not {'odd' if y % 2 == 0 else 'even'}.",
    ])  # fmt: skip


def derived_document(rng: random.Random) -> str:
    """One corpus-(b) document: a short story with a named character, dialogue and negation."""
    name = rng.choice(NAMES)
    place = rng.choice(nouns_in("place"))
    parts = [f"one day {name} went to the {place.word}."]
    makers = (_negated_fact, _negated_fact, _story_review, _story_numbers)
    parts += [rng.choice(makers)(rng, name) for _ in range(rng.randint(2, 4))]
    parts.append(rng.choice(["the end.", f"then {name} went home.", "and that was all."]))
    return sentence_case(" ".join(parts))


def corpus(kind: str, n_docs: int, seed: int) -> Iterator[str]:
    """Yield ``n_docs`` documents of corpus ``kind`` ("pretrain" = a, "derived" = b), seeded."""
    makers = {"pretrain": pretrain_document, "derived": derived_document}
    if kind not in makers:
        raise ValueError(f"unknown corpus kind {kind!r}; expected one of {sorted(makers)}")
    rng = random.Random(f"l2zo-world:{kind}:{seed}")
    for _ in range(n_docs):
        yield makers[kind](rng)


def pretrain_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """Corpus (a): facts and reviews."""
    return list(corpus("pretrain", n_docs, seed))


def derived_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """Corpus (b): stories and dialogues with negation, over the same lexicon."""
    return list(corpus("derived", n_docs, seed))
