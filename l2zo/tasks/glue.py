"""The GLUE / SuperGLUE tasks of MeZO's OPT experiments, with MeZO's templates and sampling protocol.

Every task is a :class:`GlueTask`: a data source (``l2zo.tasks.sources``), a template (``l2zo.tasks.templates``)
and MeZO's settings (loss kind, default dev size). ``load`` samples train/dev/test as MeZO does
(``l2zo.tasks.sampling``); BoolQ and MultiRC, which ship only a validation file in ../shared/data, are split into
disjoint pools instead, and ``TaskData.notes`` / ``TaskData.source`` say so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from l2zo.errors import L2ZOError
from l2zo.tasks import templates
from l2zo.tasks.base import Example, SplitSizes, TaskData, register_task
from l2zo.tasks.sampling import sample_test, sample_train_dev, split_pools
from l2zo.tasks.sources import (
    RawData,
    Record,
    SourceSpec,
    Split,
    boolq_local,
    label_map,
    load_raw,
    multirc_local,
    wic_local,
    wsc_local,
)
from l2zo.tasks.templates import Template


@dataclass(frozen=True)
class GlueTask:
    """A MeZO task: implements the :class:`l2zo.tasks.base.Task` protocol."""

    name: str
    description: str
    loss_kind: str
    default_dev: int
    spec: SourceSpec
    template: Template

    @property
    def default_sizes(self) -> SplitSizes:
        """MeZO's sizes for this task: 1000 train, ``default_dev`` dev, up to 1000 test."""
        return SplitSizes(train=1000, dev=self.default_dev, test=1000)

    def load(self, data_dir: Path | None, sizes: SplitSizes, seed: int) -> TaskData:
        raw = load_raw(self.spec, data_dir)
        notes: list[str] = []
        train_split, (train_idx, dev_idx, test_idx), source = self._sample(raw, sizes, seed, notes)
        return TaskData(
            train=self.examples(train_split, train_idx),
            dev=self.examples(train_split, dev_idx),
            test=self.examples(raw.valid, test_idx),
            source=source,
            notes=[f"{self.name}: {n}" for n in notes],
        )

    def train_records(self, data_dir: Path | None, sizes: SplitSizes, seed: int) -> list[Record]:
        """The raw records (hub schema, e.g. SST-2's ``{"sentence", "label"}``) behind ``load(...).train``.

        Same sampling as :meth:`load`, before the template: for uses that need the raw text rather than
        the prompt (e.g. unlabeled continued LM training on the train sentences).
        """
        raw = load_raw(self.spec, data_dir)
        train_split, (train_idx, _, _), _ = self._sample(raw, sizes, seed, [])
        return [train_split.records[i] for i in train_idx]

    def _sample(
        self, raw: RawData, sizes: SplitSizes, seed: int, notes: list[str]
    ) -> tuple[Split, tuple[np.ndarray, np.ndarray, np.ndarray], str]:
        """(the split train/dev index into, (train, dev, test) indices, source); test indexes ``raw.valid``."""
        if raw.train is None:
            groups = raw.valid.groups or list(range(len(raw.valid.records)))
            train_idx, dev_idx, test_idx = split_pools(groups, sizes, seed, notes)
            source = raw.source + f"; train/dev/test are disjoint pools of the validation file (seed {seed})"
            return raw.valid, (train_idx, dev_idx, test_idx), source
        train_idx, dev_idx = sample_train_dev(len(raw.train.records), sizes.train, sizes.dev, seed, notes)
        test_idx = sample_test(len(raw.valid.records), sizes.test, seed, notes)
        return raw.train, (train_idx, dev_idx, test_idx), raw.source

    def examples(self, split: Split, indices: Sequence[int] | np.ndarray) -> list[Example]:
        """Apply the template to the chosen records; a missing field names the field, file and record."""
        out = []
        for i in indices:
            try:
                out.append(self.template(split.records[i]))
            except KeyError as e:
                raise L2ZOError(
                    f"{split.locations[i]}: the {self.name} template needs the field {e.args[0]!r}, "
                    f"which this record lacks"
                ) from e
            except (ValueError, TypeError, AttributeError) as e:
                raise L2ZOError(f"{split.locations[i]}: bad {self.name} record: {e}") from e
        return out


def _task(
    name: str,
    description: str,
    spec: SourceSpec,
    template: Template,
    *,
    loss_kind: str = "classification",
    default_dev: int = 500,
) -> None:
    """Register ``name`` with a factory building its GlueTask (the registry wants zero-argument factories)."""
    task = GlueTask(name, description, loss_kind, default_dev, spec, template)
    register_task(name, description)(lambda: task)


_JSONL = ("train.jsonl",)

_task(
    "sst2",
    "SST-2 sentiment (GLUE): '<sentence> It was' + terrible/great",
    SourceSpec(
        "SST-2",
        ("train.tsv",),
        "dev.tsv",
        ("glue", "sst2"),
        convert_local=lambda r: [{"sentence": r["sentence"], "label": int(r["label"])}],
    ),
    templates.sst2,
)
_task(
    "rte",
    "RTE entailment (SuperGLUE): 'Does this mean that ... is true? Yes or No?'",
    SourceSpec(
        "RTE",
        _JSONL,
        "val.jsonl",
        ("super_glue", "rte"),
        convert_local=label_map({"entailment": 0, "not_entailment": 1}),
    ),
    templates.rte,
)
_task(
    "cb",
    "CommitmentBank (SuperGLUE): 3-way 'Yes, No, or Maybe?'",
    SourceSpec(
        "CB",
        _JSONL,
        "val.jsonl",
        ("super_glue", "cb"),
        convert_local=label_map({"entailment": 0, "contradiction": 1, "neutral": 2}),
    ),
    templates.cb,
    default_dev=100,
)
_task(
    "boolq",
    "BoolQ yes/no reading comprehension (passage + question)",
    SourceSpec("BoolQ", _JSONL, "val.jsonl", ("boolq", None), convert_local=boolq_local, valid_only=True),
    templates.boolq,
)
_task(
    "wsc",
    "Winograd Schema (SuperGLUE wsc.fixed): does the pronoun refer to the span?",
    SourceSpec("WSC", _JSONL, "val.jsonl", ("super_glue", "wsc.fixed"), convert_local=wsc_local),
    templates.wsc,
)
_task(
    "wic",
    "Word-in-Context (SuperGLUE): same meaning of a word in two sentences?",
    SourceSpec(
        "WiC", ("train.jsonl", "train_reformatted_*.jsonl"), "val.jsonl", ("super_glue", "wic"), convert_local=wic_local
    ),
    templates.wic,
)
_task(
    "multirc",
    "MultiRC (SuperGLUE): is this answer to the question correct? (one example per answer)",
    SourceSpec(
        "MultiRC",
        _JSONL,
        "val.jsonl",
        ("super_glue", "multirc"),
        convert_local=multirc_local,
        group_of=lambda r: r["idx"]["paragraph"],
        valid_only=True,
    ),
    templates.multirc,
)
_task(
    "copa",
    "COPA causal reasoning (SuperGLUE): premise + so/because + choice, LM loss",
    SourceSpec("COPA", ("train.jsonl", "train_idx*.jsonl"), "val.jsonl", ("super_glue", "copa")),
    templates.copa,
    loss_kind="lm",
    default_dev=100,
)
