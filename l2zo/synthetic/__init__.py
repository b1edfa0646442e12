"""The embedded tiny world: a toy lexicon and the corpora the ``tiny`` models are trained on."""

from l2zo.synthetic.world import (
    ADJECTIVES,
    CATEGORIES,
    COLOURS,
    NOUNS,
    NUMBER_WORDS,
    Adjective,
    Noun,
    derived_corpus,
    pretrain_corpus,
)

__all__ = [
    "ADJECTIVES",
    "CATEGORIES",
    "COLOURS",
    "NOUNS",
    "NUMBER_WORDS",
    "Adjective",
    "Noun",
    "derived_corpus",
    "pretrain_corpus",
]
