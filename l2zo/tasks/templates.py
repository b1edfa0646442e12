"""MeZO's prompt templates and verbalizers (``large_models/templates.py``), one function per task.

Each function maps one record in the Hugging Face hub schema (``glue/sst2``, ``super_glue/*``, ``boolq``; local
files are converted to it by ``l2zo.tasks.sources``) to an :class:`Example`. ``prompt + candidate`` is byte for
byte MeZO's ``verbalize(sample, candidate)``; the split point is chosen so the candidate can be tokenized on its
own: where MeZO puts the label word after a space, the space belongs to the candidate (" great"); where the prompt
ends in "\\n" the candidate has no leading space ("Yes").

A missing field raises ``KeyError(field)`` and a bad value ``ValueError``; the caller adds the file and record.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from l2zo.tasks.base import Example

Record = Mapping[str, Any]
Template = Callable[[Record], Example]


def _example(prompt: str, candidates: tuple[str, ...], label: Any) -> Example:
    """Build an Example after checking the label is a valid candidate index (hub test splits use -1)."""
    if isinstance(label, bool):
        label = int(label)
    if not isinstance(label, int) or not 0 <= label < len(candidates):
        raise ValueError(f"label {label!r} is not one of 0..{len(candidates) - 1}")
    return Example(prompt=prompt, candidates=candidates, label=label)


def sst2(r: Record) -> Example:
    """``{sentence} It was`` + `` terrible`` (0) / `` great`` (1)."""
    text = r["sentence"].strip()
    return _example(f"{text} It was", (" terrible", " great"), r["label"])


def rte(r: Record) -> Example:
    """Entailment (0) -> Yes, not_entailment (1) -> No."""
    prompt = f'{r["premise"]}\nDoes this mean that "{r["hypothesis"]}" is true? Yes or No?\n'
    return _example(prompt, ("Yes", "No"), r["label"])


def cb(r: Record) -> Example:
    """Entailment (0) -> Yes, contradiction (1) -> No, neutral (2) -> Maybe."""
    prompt = f'Suppose {r["premise"]} Can we infer that "{r["hypothesis"]}"? Yes, No, or Maybe?\n'
    return _example(prompt, ("Yes", "No", "Maybe"), r["label"])


def boolq(r: Record) -> Example:
    """MeZO's default BoolQ template (V3): question capitalised, "?" added; candidates ("Yes", "No")."""
    question = r["question"]
    if not question.endswith("?"):
        question = question + "?"
    question = question[0].upper() + question[1:]
    answer = r["answer"]
    if not isinstance(answer, bool):
        raise ValueError(f"answer {answer!r} is not a boolean")
    return _example(f"{r['passage']} {question}\n", ("Yes", "No"), 0 if answer else 1)


def wsc(r: Record) -> Example:
    """Does span2 (lower-cased) refer to span1? False (0) -> No, True (1) -> Yes."""
    prompt = (
        f'{r["text"]}\nIn the previous sentence, does the pronoun "{r["span2_text"].lower()}" '
        f"refer to {r['span1_text']}? Yes or No?\n"
    )
    return _example(prompt, ("No", "Yes"), r["label"])


def wic(r: Record) -> Example:
    """Same meaning of ``word`` in two sentences? False (0) -> No, True (1) -> Yes."""
    prompt = (
        f'Does the word "{r["word"]}" have the same meaning in these two sentences? Yes, No?\n'
        f"{r['sentence1']}\n{r['sentence2']}\n"
    )
    return _example(prompt, ("No", "Yes"), r["label"])


def multirc(r: Record) -> Example:
    """One answer option of one question: incorrect (0) -> No, correct (1) -> Yes."""
    prompt = (
        f"{r['paragraph']}\nQuestion: {r['question']}\n"
        f'I found this answer "{r["answer"]}". Is that correct? Yes or No?\n'
    )
    return _example(prompt, ("No", "Yes"), r["label"])


_COPA_CONJUNCTION = {"effect": " so", "cause": " because"}


def _copa_choice(choice: str) -> str:
    # MeZO's capitalization="correct": lower-case the whole first word unless it is "I"; punctuation is kept.
    words = choice.split(" ")
    if words[0] != "I":
        words[0] = words[0].lower()
    return " " + " ".join(words)


def copa(r: Record) -> Example:
    """``{premise minus final "."} so``/``because`` + `` {choice}``; label 0 -> choice1, 1 -> choice2.

    MeZO's prompt ends in " so " and its candidates have no leading space; the space is moved to the candidates
    here so that the candidate tokenizes as it would inside the sentence (the concatenation is identical).
    """
    premise = r["premise"].rstrip()
    if premise.endswith("."):
        premise = premise[:-1]
    question = r["question"]
    if question not in _COPA_CONJUNCTION:
        raise ValueError(f"question {question!r} is neither 'effect' nor 'cause'")
    candidates = (_copa_choice(r["choice1"]), _copa_choice(r["choice2"]))
    return _example(premise + _COPA_CONJUNCTION[question], candidates, r["label"])
