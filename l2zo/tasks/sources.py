"""Where task records come from: a local folder laid out like ../shared/data, or the Hugging Face hub.

Both paths return records in the hub schema (``glue/sst2``, ``super_glue/<task>``, ``boolq``), so the templates
in ``l2zo.tasks.templates`` see one format. Local conversions:

* RTE / CB: string labels ("entailment", ...) -> the hub's integer labels.
* WSC: ``target.span1_text`` / ``target.span2_text`` -> top-level ``span1_text`` / ``span2_text``.
* WiC ``train_reformatted_*.jsonl``: ``{"text": "Word: w. Sentence 1: s1 Sentence 2: s2", "label": 0/1}`` is
  parsed back into ``word`` / ``sentence1`` / ``sentence2``.
* BoolQ (SuperGLUE file): ``label`` (bool) -> ``answer`` as in the standalone ``boolq`` hub dataset.
* MultiRC: one passage per line with nested questions/answers -> one record per answer option, as on the hub.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from l2zo.errors import L2ZOError, not_utf8

Record = dict[str, Any]
Converter = Callable[[Record], list[Record]]


@dataclass
class Split:
    """Records of one split, with a human-readable location for each (for error messages).

    ``groups`` (optional) gives a group id per record; records sharing one (MultiRC: a passage) are kept in the
    same pool when a validation file is split into train/dev/test pools.
    """

    records: list[Record]
    locations: list[str]
    groups: list[Hashable] | None = None


@dataclass
class RawData:
    """The train split (None when the source has only a validation split) and the validation split."""

    train: Split | None
    valid: Split
    source: str


@dataclass(frozen=True)
class SourceSpec:
    """How to find one task locally and on the hub.

    Attributes:
        folder: the task's folder under data_dir, e.g. "SST-2".
        train_globs: file patterns tried in order; the first one matching any file is the train split (all its
            matches, in natural sort order, are concatenated).
        valid_file: the validation file name.
        hub: ``(path, name)`` for ``datasets.load_dataset``.
        convert_local / convert_hub: record -> list of hub-schema records (a list, so MultiRC can expand).
        group_of: record -> group id, for pool splitting by group.
        valid_only: the local copy may lack a train split (BoolQ, MultiRC); pools are then split from validation.
    """

    folder: str
    train_globs: tuple[str, ...]
    valid_file: str
    hub: tuple[str, str | None]
    convert_local: Converter = lambda r: [r]
    convert_hub: Converter = lambda r: [r]
    group_of: Callable[[Record], Hashable] | None = None
    valid_only: bool = False


# ---------------------------------------------------------------------------------------------- local converters


def label_map(mapping: dict[str, int]) -> Converter:
    """Map string labels to the hub's integers (integers pass through)."""

    def convert(r: Record) -> list[Record]:
        label = r["label"]
        if isinstance(label, str):
            if label not in mapping:
                raise ValueError(f"label {label!r} is not one of {sorted(mapping)}")
            label = mapping[label]
        return [{**r, "label": label}]

    return convert


def wsc_local(r: Record) -> list[Record]:
    target = r["target"]
    return [{**r, "span1_text": target["span1_text"], "span2_text": target["span2_text"], "label": r["label"]}]


_WIC_TEXT = re.compile(r"^Word: (?P<word>.+?)\. Sentence 1: (?P<sentence1>.*?) Sentence 2: (?P<sentence2>.*)$", re.S)


def wic_local(r: Record) -> list[Record]:
    if "text" not in r or "word" in r:  # SuperGLUE val.jsonl already has word/sentence1/sentence2
        return [{**r, "label": r["label"]}]
    match = _WIC_TEXT.match(r["text"])
    if match is None:
        raise ValueError('"text" does not read "Word: <w>. Sentence 1: <s1> Sentence 2: <s2>"')
    return [{**match.groupdict(), "label": r["label"]}]


def boolq_local(r: Record) -> list[Record]:
    answer = r["answer"] if "answer" in r else r["label"]
    return [{"question": r["question"], "passage": r["passage"], "answer": answer}]


def multirc_local(r: Record) -> list[Record]:
    passage = r["passage"]
    out = []
    for q in passage["questions"]:
        for a in q["answers"]:
            idx = {"paragraph": r["idx"], "question": q["idx"], "answer": a["idx"]}
            out.append(
                {
                    "paragraph": passage["text"],
                    "question": q["question"],
                    "answer": a["text"],
                    "label": a["label"],
                    "idx": idx,
                }
            )
    return out


# --------------------------------------------------------------------------------------------------- local files


def _natural_key(path: Path) -> list[Any]:
    # train_idx0-367 before train_idx368-399, train_reformatted_200 before ..._5228.
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", path.name)]


def _read_rows(path: Path) -> list[tuple[int, Record]]:
    """(line number, record) for a .jsonl file or a headered .tsv file."""
    try:
        return _read_lines(path)
    except UnicodeDecodeError as e:
        raise not_utf8(path, e, "data file") from None


def _read_lines(path: Path) -> list[tuple[int, Record]]:
    rows: list[tuple[int, Record]] = []
    with path.open(encoding="utf-8") as f:
        if path.suffix == ".tsv":
            # QUOTE_NONE: SST-2 sentences contain bare quote characters.
            for i, row in enumerate(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=2):
                rows.append((i, dict(row)))
            return rows
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise L2ZOError(f"{path} line {i}: not valid JSON ({e.msg}); expected one JSON object per line") from e
    return rows


def convert_rows(rows: list[tuple[str, Record]], convert: Converter, spec: SourceSpec) -> Split:
    """Apply a converter to (location, record) pairs, turning a missing field or bad value into an L2ZOError."""
    records: list[Record] = []
    locations: list[str] = []
    for where, raw in rows:
        try:
            converted = convert(raw)
        except KeyError as e:
            raise L2ZOError(f"{where}: record is missing the field {e.args[0]!r}") from e
        except (ValueError, TypeError) as e:
            raise L2ZOError(f"{where}: {e}") from e
        records.extend(converted)
        locations.extend([where] * len(converted))
    groups = [spec.group_of(r) for r in records] if spec.group_of else None
    return Split(records, locations, groups)


def _read_split(paths: list[Path], spec: SourceSpec) -> Split:
    rows = [(f"{path} line {i}", r) for path in paths for i, r in _read_rows(path)]
    split = convert_rows(rows, spec.convert_local, spec)
    if not split.records:
        raise L2ZOError(f"{', '.join(map(str, paths))}: no records (empty split); expected one record per line")
    return split


def load_local(spec: SourceSpec, data_dir: Path) -> RawData:
    """Read a task from ``data_dir/<folder>``; see the module docstring for the formats."""
    folder = Path(data_dir) / spec.folder
    expected = f"{spec.valid_file} and a train split ({' or '.join(spec.train_globs)})"
    if spec.valid_only:
        expected = f"{spec.valid_file} (and optionally {' or '.join(spec.train_globs)})"
    if not folder.is_dir():
        raise L2ZOError(
            f"task folder {folder} does not exist; expected it to hold {expected}. "
            f"--data-dir must point at a folder laid out like ../shared/data (one folder per task)"
        )
    valid_path = folder / spec.valid_file
    if not valid_path.is_file():
        raise L2ZOError(f"missing validation file {valid_path}; expected {folder} to hold {expected}")
    train_paths: list[Path] = []
    for pattern in spec.train_globs:
        train_paths = sorted(folder.glob(pattern), key=_natural_key)
        if train_paths:
            break
    if not train_paths and not spec.valid_only:
        raise L2ZOError(f"no train file in {folder}; expected {expected}")
    train = _read_split(train_paths, spec) if train_paths else None
    valid = _read_split([valid_path], spec)
    names = ", ".join(p.name for p in train_paths) or "(none)"
    return RawData(train, valid, source=f"local {folder} (train: {names}; validation: {spec.valid_file})")


# ----------------------------------------------------------------------------------------------------------- hub


def load_hub(spec: SourceSpec) -> RawData:
    """Load the task's train and validation splits with ``datasets.load_dataset`` (needs the network)."""
    path, name = spec.hub
    label = f"{path}/{name}" if name else path
    try:
        import datasets  # deferred: slow to import and unused with --data-dir

        loaded = datasets.load_dataset(path, name)
        splits = {s: loaded[s].to_list() for s in ("train", "validation")}
    except Exception as e:  # any hub failure (offline, renamed dataset, ...) becomes one actionable message
        raise L2ZOError(
            f"could not load {label} from the Hugging Face hub ({type(e).__name__}: {e}). Offline? Pass --data-dir "
            f"with a local copy laid out like ../shared/data, e.g. {spec.folder}/{spec.valid_file} "
            f"and {spec.folder}/{spec.train_globs[0]}"
        ) from e
    train, valid = (
        convert_rows([(f"hub {label} {s} row {i}", r) for i, r in enumerate(splits[s])], spec.convert_hub, spec)
        for s in ("train", "validation")
    )
    for s, split in (("train", train), ("validation", valid)):
        if not split.records:
            raise L2ZOError(f"hub {label}: the {s} split is empty")
    return RawData(train, valid, source=f"hub {label} (train / validation)")


def load_raw(spec: SourceSpec, data_dir: Path | None) -> RawData:
    """Local folder when ``data_dir`` is given, else the hub."""
    return load_hub(spec) if data_dir is None else load_local(spec, Path(data_dir))
