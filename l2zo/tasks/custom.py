"""User-defined classification tasks from a YAML file: ``load_yaml_task(path) -> Task``.

Schema (keys not listed here are rejected)::

    name: review-sentiment                       # required
    description: 3-way sentiment of product reviews   # optional
    template: "Review: {text}\\nSentiment:"       # required: Python str.format with named fields of a record
    verbalizer:                                  # required: label value -> candidate string, >= 2 classes
      negative: " bad"                           # (mind the leading space after "Sentiment:")
      neutral: " okay"
      positive: " good"
    label_field: label                           # required: the record field holding the label
    data:                                        # required
      train: data/train.jsonl                    # required
      dev: data/dev.csv                          # optional; if absent, dev is carved from train as in MeZO
      test: data/test.txt                        # required
      format: lines                              # optional: jsonl | csv | tsv | lines (default: by extension)
    sizes:                                       # optional; MeZO's defaults
      num_train: 1000
      num_dev: 500
      num_test: 1000
    loss_kind: classification                    # optional: classification (default) | lm

File formats, chosen by extension unless ``data.format`` is given: ``.jsonl`` (one JSON object per line),
``.csv`` / ``.tsv`` (a header row names the fields), ``.txt`` or ``format: lines`` (one ``label text`` per line,
split at the first whitespace; the fields are ``label`` and ``text``). Labels are matched to the verbalizer keys
as strings, so ``1`` in a CSV matches ``1:`` in the YAML. Relative paths resolve against the YAML file's folder.
The candidate order is the verbalizer's order. ``data_dir`` passed to ``load`` is ignored.
"""

from __future__ import annotations

import csv
import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from l2zo.errors import L2ZOError, not_utf8
from l2zo.tasks.base import Example, SplitSizes, TaskData
from l2zo.tasks.sampling import sample, sample_test, sample_train_dev

_TOP_KEYS = {"name", "description", "template", "verbalizer", "label_field", "data", "sizes", "loss_kind"}
_REQUIRED = ("name", "template", "verbalizer", "label_field", "data")
_DATA_KEYS = {"train", "dev", "test", "format"}
_SIZE_KEYS = {"num_train": "train", "num_dev": "dev", "num_test": "test"}
_FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv", ".txt": "lines"}


@dataclass(frozen=True)
class YamlTask:
    """A classification task defined by a YAML file; implements the Task protocol."""

    name: str
    description: str
    loss_kind: str
    default_dev: int
    default_sizes: SplitSizes
    template: str
    fields: tuple[str, ...]  # named fields the template uses
    verbalizer: dict[str, str]  # label (as a string) -> candidate
    label_field: str
    files: dict[str, Path]  # "train", "test" and optionally "dev"
    file_format: str | None
    yaml_path: Path

    def load(self, data_dir: Path | None, sizes: SplitSizes, seed: int) -> TaskData:
        notes: list[str] = []
        train_recs = self._read("train")
        if "dev" in self.files:
            dev_recs = self._read("dev")
            train = [train_recs[i] for i in sample(len(train_recs), sizes.train, seed)]
            dev = [dev_recs[i] for i in sample(len(dev_recs), sizes.dev, seed)]
        else:
            tr, dv = sample_train_dev(len(train_recs), sizes.train, sizes.dev, seed, notes, what="train file")
            train, dev = [train_recs[i] for i in tr], [train_recs[i] for i in dv]
        test_recs = self._read("test")
        test = [test_recs[i] for i in sample_test(len(test_recs), sizes.test, seed, notes, what="test file")]
        source = ", ".join(f"{k}: {p}" for k, p in self.files.items())
        return TaskData(
            train, dev, test, source=f"{self.yaml_path} ({source})", notes=[f"{self.name}: {n}" for n in notes]
        )

    def _read(self, split: str) -> list[Example]:
        """All records of one data file as Examples, validated against the template and the verbalizer."""
        path = self.files[split]
        fmt = self.file_format or _FORMATS[path.suffix.lower()]
        rows = _read_file(path, fmt)
        if not rows:
            raise L2ZOError(f"{path} (data.{split}) has no records; expected at least one")
        labels = list(self.verbalizer)
        candidates = tuple(self.verbalizer.values())
        out = []
        for line, rec in rows:
            where = f"{path} line {line}"
            for name in (*self.fields, self.label_field):
                if name not in rec:
                    raise L2ZOError(
                        f"{where}: missing the field {name!r} (used by "
                        f"{'label_field' if name == self.label_field else 'template'}); "
                        f"fields present: {', '.join(map(str, rec))}"
                    )
            label = str(rec[self.label_field])
            if label not in self.verbalizer:
                raise L2ZOError(
                    f"{where}: label {label!r} is not a verbalizer key; add it to verbalizer or fix "
                    f"the data (keys: {', '.join(labels)})"
                )
            try:
                prompt = self.template.format(**rec)
            except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
                raise L2ZOError(f"{where}: the template cannot be filled from this record ({e!r})") from e
            out.append(Example(prompt, candidates, labels.index(label)))
        return out


def _read_file(path: Path, fmt: str) -> list[tuple[int, dict[str, Any]]]:
    """(record number, record) pairs; the number is the 1-based line in the file."""
    try:
        return _read_records(path, fmt)
    except UnicodeDecodeError as e:
        raise not_utf8(path, e, "data file") from None


def _read_records(path: Path, fmt: str) -> list[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8", newline="" if fmt in ("csv", "tsv") else None) as f:
        if fmt in ("csv", "tsv"):
            reader = csv.DictReader(f, delimiter="," if fmt == "csv" else "\t")
            return [(i, dict(r)) for i, r in enumerate(reader, start=2)]
        rows = []
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if fmt == "jsonl":
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise L2ZOError(f"{path} line {i}: not valid JSON ({e.msg}); jsonl needs one object a line") from e
                if not isinstance(rec, dict):
                    raise L2ZOError(f"{path} line {i}: expected a JSON object, got {type(rec).__name__}")
            else:
                parts = line.strip().split(maxsplit=1)
                rec = {"label": parts[0], "text": parts[1] if len(parts) > 1 else ""}
            rows.append((i, rec))
        return rows


def _check_keys(mapping: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(mapping, dict):
        raise L2ZOError(f"{where} must be a mapping, got {type(mapping).__name__}")
    unknown = sorted(set(map(str, mapping)) - allowed)
    if unknown:
        raise L2ZOError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(allowed))}")
    return mapping


def _template_fields(template: Any, where: str) -> tuple[str, ...]:
    if not isinstance(template, str) or not template:
        raise L2ZOError(f"{where}: 'template' must be a non-empty string, e.g. \"Review: {{text}}\\nSentiment:\"")
    try:
        parsed = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        msg = f"{where}: 'template' is not a valid format string ({e}); write literal braces as {{{{ }}}}"
        raise L2ZOError(msg) from e
    if any(f == "" or f.isdigit() for f in parsed):
        raise L2ZOError(f"{where}: 'template' uses a positional field '{{}}'; name the record field, e.g. {{text}}")
    roots = [f.split(".")[0].split("[")[0] for f in parsed]
    return tuple(dict.fromkeys(roots))


def _sizes(raw: Any, where: str) -> SplitSizes:
    raw = _check_keys(raw if raw is not None else {}, set(_SIZE_KEYS), f"{where}: 'sizes'")
    values = {}
    for key, value in raw.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise L2ZOError(f"{where}: sizes.{key} must be a non-negative integer, got {value!r}")
        values[_SIZE_KEYS[key]] = value
    return SplitSizes(**values)


def _files(raw: Any, folder: Path, where: str) -> tuple[dict[str, Path], str | None]:
    data = _check_keys(raw, _DATA_KEYS, f"{where}: 'data'")
    for key in ("train", "test"):
        if key not in data:
            raise L2ZOError(f"{where}: data.{key} is missing; give the path of the {key} file")
    fmt = data.get("format")
    if fmt is not None and fmt not in ("jsonl", "csv", "tsv", "lines"):
        raise L2ZOError(f"{where}: data.format {fmt!r} is not one of jsonl, csv, tsv, lines")
    files = {}
    for key in ("train", "dev", "test"):
        if key not in data:
            continue
        path = Path(str(data[key]))
        path = path if path.is_absolute() else folder / path
        if not path.is_file():
            raise L2ZOError(f"{where}: data.{key} file {path} does not exist (relative paths resolve against {folder})")
        if fmt is None and path.suffix.lower() not in _FORMATS:
            raise L2ZOError(
                f"{where}: cannot tell the format of data.{key} ({path.name}) from its extension; use "
                f".jsonl, .csv, .tsv or .txt, or set data.format"
            )
        files[key] = path
    return files, fmt


def load_yaml_task(path: Path) -> YamlTask:
    """Read and validate a task YAML file (schema in the module docstring); the data is read by ``load``."""
    path = Path(path)
    if not path.is_file():
        raise L2ZOError(f"task file {path} does not exist; give the path of a task YAML file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise not_utf8(path, e, "task file") from None
    except yaml.YAMLError as e:
        raise L2ZOError(f"{path} is not valid YAML: {e}") from e
    where = str(path)
    cfg = _check_keys(raw, _TOP_KEYS, where)
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise L2ZOError(f"{where}: missing required key(s) {', '.join(missing)}; see l2zo.tasks.custom for the schema")
    fields = _template_fields(cfg["template"], where)
    verbalizer = cfg["verbalizer"]
    if not isinstance(verbalizer, dict) or len(verbalizer) < 2:
        raise L2ZOError(
            f"{where}: 'verbalizer' must map at least 2 label values to candidate strings, "
            f"e.g. {{0: ' bad', 1: ' good'}}"
        )
    bad = [k for k, v in verbalizer.items() if not isinstance(v, str) or not v]
    if bad:
        raise L2ZOError(f"{where}: verbalizer entries for {bad} must be non-empty strings")
    verbalizer = {str(k): v for k, v in verbalizer.items()}
    if len(set(verbalizer.values())) != len(verbalizer):
        raise L2ZOError(f"{where}: two labels share one candidate string in 'verbalizer'; candidates must differ")
    label_field = cfg["label_field"]
    if not isinstance(label_field, str) or not label_field:
        raise L2ZOError(f"{where}: 'label_field' must name the record field holding the label, e.g. label")
    loss_kind = cfg.get("loss_kind", "classification")
    if loss_kind not in ("classification", "lm"):
        raise L2ZOError(f"{where}: loss_kind {loss_kind!r} is not one of classification, lm")
    files, fmt = _files(cfg["data"], path.parent, where)
    sizes = _sizes(cfg.get("sizes"), where)
    return YamlTask(
        name=str(cfg["name"]),
        description=str(cfg.get("description", f"user task from {path.name}")),
        loss_kind=loss_kind,
        default_dev=sizes.dev,
        default_sizes=sizes,
        template=cfg["template"],
        fields=fields,
        verbalizer=verbalizer,
        label_field=label_field,
        files=files,
        file_format=fmt,
        yaml_path=path,
    )
