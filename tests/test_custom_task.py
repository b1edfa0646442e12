"""User tasks from YAML: a 3-class task in jsonl / csv / `label text` files, and every validation error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from l2zo.errors import L2ZOError
from l2zo.tasks import SplitSizes, Task, get_task
from l2zo.tasks.custom import load_yaml_task

LABELS = ("neg", "neu", "pos")
CANDIDATES = (" bad", " okay", " good")


def _records(n: int, offset: int = 0) -> list[dict[str, str]]:
    return [{"text": f"review number {offset + i}", "label": LABELS[(offset + i) % 3]} for i in range(n)]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _write_csv(path: Path, records: list[dict[str, str]]) -> None:
    path.write_text("text,label\n" + "".join(f'"{r["text"]}",{r["label"]}\n' for r in records))


def _write_lines(path: Path, records: list[dict[str, str]]) -> None:
    path.write_text("".join(f"{r['label']} {r['text']}\n" for r in records))


def _config(**overrides) -> dict:
    cfg = {
        "name": "reviews",
        "description": "3-way review sentiment",
        "template": "Review: {text}\nSentiment:",
        "verbalizer": dict(zip(LABELS, CANDIDATES, strict=True)),
        "label_field": "label",
        "data": {"train": "data/train.jsonl", "test": "data/test.csv"},
        "sizes": {"num_train": 20, "num_dev": 10, "num_test": 15},
    }
    cfg.update(overrides)
    return cfg


@pytest.fixture
def task_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    _write_jsonl(data / "train.jsonl", _records(40))
    _write_csv(data / "test.csv", _records(12, offset=100))
    _write_lines(data / "dev.txt", _records(9, offset=200))
    _write_csv(data / "test.tsv", _records(3))  # a comma file under a .tsv name, for the format check
    return tmp_path


def _yaml(task_dir: Path, cfg: dict, name: str = "task.yaml") -> Path:
    path = task_dir / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_three_class_task_loads_and_carves_dev_from_train(task_dir: Path) -> None:
    task = load_yaml_task(_yaml(task_dir, _config()))
    assert isinstance(task, Task) and task.name == "reviews" and task.loss_kind == "classification"
    assert task.default_dev == 10 and task.default_sizes == SplitSizes(20, 10, 15)
    data = task.load(None, task.default_sizes, seed=0)
    assert (len(data.train), len(data.dev), len(data.test)) == (20, 10, 12)  # test file has only 12
    assert any("test uses all 12" in n for n in data.notes)
    for ex in data.train + data.dev + data.test:
        assert ex.candidates == CANDIDATES
        number = int(ex.prompt.split("number ")[1].split("\n")[0])
        assert ex.prompt == f"Review: review number {number}\nSentiment:"
        assert ex.label == number % 3  # neg/neu/pos -> 0/1/2 in verbalizer order
    train_prompts = {e.prompt for e in data.train}
    assert train_prompts.isdisjoint({e.prompt for e in data.dev})
    assert data == task.load(None, task.default_sizes, seed=0)  # same seed, same sample


def test_dev_file_in_label_text_format_and_get_task(task_dir: Path) -> None:
    cfg = _config(data={"train": "data/train.jsonl", "dev": "data/dev.txt", "test": "data/test.csv"})
    task = get_task(str(_yaml(task_dir, cfg)))
    data = task.load(None, SplitSizes(40, 100, 100), seed=1)
    assert (len(data.train), len(data.dev), len(data.test)) == (40, 9, 12)
    assert all(200 <= int(e.prompt.split("number ")[1].split("\n")[0]) < 209 for e in data.dev)


def test_lines_format_override_and_integer_labels(task_dir: Path) -> None:
    (task_dir / "data" / "train.dat").write_text("".join(f"{i % 2} text {i}\n" for i in range(10)))
    cfg = _config(
        template="{text} =",
        verbalizer={0: " no", 1: " yes"},
        data={"train": "data/train.dat", "test": "data/train.dat", "format": "lines"},
        sizes=None,
    )
    del cfg["sizes"]
    task = load_yaml_task(_yaml(task_dir, cfg))
    assert task.default_sizes == SplitSizes()
    data = task.load(None, SplitSizes(6, 2, 5), seed=0)
    assert (len(data.train), len(data.dev), len(data.test)) == (6, 2, 5)
    for ex in data.test:
        assert ex.label == int(ex.prompt.split()[1]) % 2 and ex.candidates == (" no", " yes")


def _error(task_dir: Path, cfg: dict | str, load: bool = False) -> str:
    path = task_dir / "bad.yaml"
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False))
    with pytest.raises(L2ZOError) as info:
        task = load_yaml_task(path)
        if load:
            task.load(None, task.default_sizes, seed=0)
    return str(info.value)


def _without(key: str) -> dict:
    cfg = _config()
    del cfg[key]
    return cfg


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        (_config(epochs=3), r"unknown key\(s\) epochs; valid keys: data, description"),
        (_without("template"), r"missing required key\(s\) template"),
        (_without("label_field"), r"missing required key\(s\) label_field"),
        (_config(verbalizer={"pos": " good"}), "at least 2 label values"),
        (_config(verbalizer={"a": " x", "b": 3}), r"verbalizer entries for \['b'\] must be non-empty strings"),
        (_config(verbalizer={"a": " x", "b": " x"}), "share one candidate"),
        (_config(template="Review: {}"), "positional field"),
        (_config(template="Review: {text"), "not a valid format string"),
        (_config(data={"train": "data/train.jsonl"}), "data.test is missing"),
        (_config(data={"train": "data/train.jsonl", "test": "data/nope.csv"}), r"data.test file .*nope\.csv does not"),
        (_config(data={"train": "data/train.jsonl", "test": "data/test.csv", "valid": "x"}), "unknown key.*valid"),
        (_config(data={"train": "data/train.jsonl", "test": "data/test.csv", "format": "xml"}), "data.format 'xml'"),
        (_config(sizes={"num_train": -1}), "sizes.num_train must be a non-negative integer"),
        (_config(sizes={"train": 5}), r"unknown key\(s\) train; valid keys: num_dev"),
        (_config(loss_kind="mse"), "loss_kind 'mse'"),
        (_config(label_field=""), "'label_field' must name"),
        ("name: [unclosed", "not valid YAML"),
        ("- a list", "must be a mapping"),
    ],
)
def test_schema_errors(task_dir: Path, cfg: dict | str, expected: str) -> None:
    message = _error(task_dir, cfg)
    assert re.search(expected, message), message


def test_data_errors_name_file_line_and_fix(task_dir: Path) -> None:
    data = task_dir / "data"
    _write_jsonl(data / "typo.jsonl", _records(3) + [{"txt": "oops", "label": "pos"}])
    msg = _error(task_dir, _config(data={"train": "data/typo.jsonl", "test": "data/test.csv"}), load=True)
    assert "typo.jsonl line 4" in msg and "'text'" in msg and "template" in msg

    _write_jsonl(data / "odd.jsonl", _records(2) + [{"text": "x", "label": "great"}])
    msg = _error(task_dir, _config(data={"train": "data/odd.jsonl", "test": "data/test.csv"}), load=True)
    assert "odd.jsonl line 3" in msg and "label 'great' is not a verbalizer key" in msg and "neg, neu, pos" in msg

    msg = _error(task_dir, _config(label_field="sentiment"), load=True)
    assert "missing the field 'sentiment' (used by label_field)" in msg

    (data / "empty.jsonl").write_text("\n")
    msg = _error(task_dir, _config(data={"train": "data/empty.jsonl", "test": "data/test.csv"}), load=True)
    assert "has no records" in msg

    (data / "broken.jsonl").write_text('{"text": "a", "label": "neg"}\n{not json\n')
    msg = _error(task_dir, _config(data={"train": "data/broken.jsonl", "test": "data/test.csv"}), load=True)
    assert "broken.jsonl line 2: not valid JSON" in msg

    msg = _error(task_dir, _config(data={"train": "data/train.jsonl", "test": "data/test.tsv"}), load=True)
    assert "test.tsv line 2: missing the field 'text'" in msg  # a CSV file read as TSV has one merged column

    (data / "train.parquet").write_text("x")
    msg = _error(task_dir, _config(data={"train": "data/train.parquet", "test": "data/test.csv"}))
    assert "cannot tell the format" in msg and "data.format" in msg


def test_missing_yaml_file(tmp_path: Path) -> None:
    with pytest.raises(L2ZOError, match="does not exist"):
        get_task(str(tmp_path / "nope.yaml"))
