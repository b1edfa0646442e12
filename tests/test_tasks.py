"""The eight MeZO tasks on the real files in ../shared/data: sizes, templates, labels, seeds, pools, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from l2zo.errors import L2ZOError
from l2zo.tasks import SplitSizes, TaskData, get_task, task_names
from l2zo.tasks.base import Task
from l2zo.tasks.glue import GlueTask
from l2zo.tasks.sampling import sample, sample_train_dev, split_pools
from l2zo.tasks.sources import load_hub, load_raw

TASKS = ("sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc", "copa")

# (train, dev, test) with MeZO's defaults: 1000 / 500 (100 for CB, COPA) / up to 1000 from validation.
EXPECTED_SIZES = {
    "sst2": (1000, 500, 872),  # validation = dev.tsv, 872 sentences
    "rte": (1000, 500, 277),
    "cb": (150, 100, 56),  # 250 train: train shrinks, dev is kept
    "boolq": (1000, 500, 1000),  # pools split from the 3270-example validation file
    "wsc": (54, 500, 104),  # 554 train: MeZO keeps dev at 500, leaving 54 to train
    "wic": (1000, 500, 638),
    "multirc": (1000, 500, 1000),  # pools by passage from 4848 answer options
    "copa": (300, 100, 100),
}


def _task(name: str) -> GlueTask:
    task = get_task(name)
    assert isinstance(task, GlueTask) and isinstance(task, Task)
    return task


@pytest.fixture(scope="module")
def loaded(shared_data_dir: Path) -> dict[str, TaskData]:
    """Every task loaded once (SST-2's 67k-line train.tsv included) with MeZO's default sizes, seed 0."""
    return {name: _task(name).load(shared_data_dir, _task(name).default_sizes, seed=0) for name in TASKS}


def test_registry_lists_the_eight_tasks() -> None:
    names = task_names()
    for name in TASKS:
        assert name in names and names[name]
    with pytest.raises(L2ZOError, match="unknown task 'sst3'"):
        get_task("sst3")


@pytest.mark.parametrize("name", TASKS)
def test_sizes_and_settings(loaded: dict[str, TaskData], name: str) -> None:
    data = loaded[name]
    assert (len(data.train), len(data.dev), len(data.test)) == EXPECTED_SIZES[name]
    task = _task(name)
    assert task.loss_kind == ("lm" if name == "copa" else "classification")
    assert task.default_dev == (100 if name in ("cb", "copa") else 500)
    for ex in data.train[:50] + data.test[:50]:
        assert 0 <= ex.label < len(ex.candidates) and ex.prompt
    assert data.source.startswith("local ")


def test_notes_report_shrinking_and_pools(loaded: dict[str, TaskData]) -> None:
    assert any("train shrunk to 150, dev kept at 100" in n for n in loaded["cb"].notes)
    assert any("train shrunk to 54" in n for n in loaded["wsc"].notes)
    for name in ("boolq", "multirc"):
        assert any("disjoint pools" in n for n in loaded[name].notes)
        assert "disjoint pools of the validation file" in loaded[name].source
    assert any("83 groups" in n for n in loaded["multirc"].notes)


def _first(name: str, data_dir: Path, split: str = "valid", index: int = 0):
    task = _task(name)
    raw = load_raw(task.spec, data_dir)
    return task.examples(getattr(raw, split), [index])[0]


def test_templates_match_mezo_on_known_records(shared_data_dir: Path) -> None:
    ex = _first("sst2", shared_data_dir, "train")  # "hide new secretions from the parental units \t0"
    assert ex.prompt == "hide new secretions from the parental units It was"
    assert ex.candidates == (" terrible", " great") and ex.label == 0
    assert ex.prompt + ex.candidates[1] == "hide new secretions from the parental units It was great"

    ex = _first("rte", shared_data_dir)
    assert ex.prompt.startswith("Dana Reeve, the widow of the actor Christopher Reeve,")
    assert ex.prompt.endswith('\nDoes this mean that "Christopher Reeve had an accident." is true? Yes or No?\n')
    assert ex.candidates == ("Yes", "No") and ex.label == 1  # not_entailment -> No

    ex = _first("cb", shared_data_dir, index=1)  # neutral
    assert ex.prompt.startswith("Suppose ``Who knows?")
    assert ex.prompt.endswith('Can we infer that "there is a shipment"? Yes, No, or Maybe?\n')
    assert ex.candidates == ("Yes", "No", "Maybe") and ex.label == 2

    ex = _first("boolq", shared_data_dir)
    assert ex.prompt.startswith("Ethanol fuel -- All biomass")
    assert ex.prompt.endswith(" Does ethanol take more energy make that produces?\n")
    assert ex.candidates == ("Yes", "No") and ex.label == 1  # answer False -> No

    ex = _first("wsc", shared_data_dir)
    assert ex.prompt.endswith('\nIn the previous sentence, does the pronoun "him" refer to anyone? Yes or No?\n')
    assert ex.candidates == ("No", "Yes") and ex.label == 0

    ex = _first("wic", shared_data_dir)
    assert ex.prompt == (
        'Does the word "class" have the same meaning in these two sentences? Yes, No?\n'
        "An emerging professional class.\nApologizing for losing your temper, even though you were "
        "badly provoked, showed real class.\n"
    )
    assert ex.candidates == ("No", "Yes") and ex.label == 0

    ex = _first("multirc", shared_data_dir)
    assert ex.prompt.startswith("What causes a change in motion?")
    assert ex.prompt.endswith(
        "\nQuestion: Would the mass of a baseball affect how much force you have to use to "
        'pick it up?\nI found this answer "No". Is that correct? Yes or No?\n'
    )
    assert ex.candidates == ("No", "Yes") and ex.label == 0

    ex = _first("copa", shared_data_dir)  # effect; choice2 is right
    assert ex.prompt == "The man turned on the faucet so"
    assert ex.candidates == (" the toilet filled with water.", " water flowed from the spout.") and ex.label == 1


def test_wic_reformatted_train_is_parsed(shared_data_dir: Path) -> None:
    # train_reformatted_200.jsonl line 1: {"label": 0, "text": "Word: go. Sentence 1: How fast ... Sentence 2: ..."}
    ex = _first("wic", shared_data_dir, "train")
    assert ex.prompt == (
        'Does the word "go" have the same meaning in these two sentences? Yes, No?\n'
        "How fast does your new car go ?\nThe patient went peacefully .\n"
    )
    assert ex.label == 0


def test_copa_keeps_capital_i() -> None:
    from l2zo.tasks.templates import copa

    ex = copa(
        {
            "premise": "My friend left.",
            "question": "cause",
            "choice1": "I was rude.",
            "choice2": "NASA called him.",
            "label": 0,
        }
    )
    assert ex.prompt == "My friend left because"
    assert ex.candidates == (" I was rude.", " nasa called him.")  # MeZO lower-cases the whole first word


def test_same_seed_same_sample_other_seed_differs(shared_data_dir: Path, loaded: dict[str, TaskData]) -> None:
    task = _task("rte")
    again = task.load(shared_data_dir, task.default_sizes, seed=0)
    assert again.train == loaded["rte"].train and again.dev == loaded["rte"].dev and again.test == loaded["rte"].test
    other = task.load(shared_data_dir, task.default_sizes, seed=1)
    assert other.train != again.train
    # (RTE's train file holds two duplicated pairs, so disjointness is checked on indices below.)


def test_sampling_is_mezos_numpy_stream() -> None:
    np.random.seed(3)
    legacy = np.random.permutation(50)[:20]
    assert (sample(50, 20, 3) == legacy).all()
    notes: list[str] = []
    train, dev = sample_train_dev(50, 10, 5, 3, notes)
    assert (train == legacy[:10]).all() and (dev == legacy[10:15]).all() and not notes
    train, dev = sample_train_dev(2490, 1000, 500, 0, notes)
    assert len(set(train)) == 1000 and len(set(dev)) == 500 and set(train).isdisjoint(dev)


def test_boolq_pools_are_disjoint(loaded: dict[str, TaskData]) -> None:
    data = loaded["boolq"]
    prompts = [{e.prompt for e in split} for split in (data.train, data.dev, data.test)]
    assert all(a.isdisjoint(b) for i, a in enumerate(prompts) for b in prompts[i + 1 :])


def test_multirc_pools_are_disjoint_by_passage(loaded: dict[str, TaskData]) -> None:
    data = loaded["multirc"]
    passages = [{e.prompt.split("\nQuestion: ")[0] for e in split} for split in (data.train, data.dev, data.test)]
    assert all(a.isdisjoint(b) for i, a in enumerate(passages) for b in passages[i + 1 :])
    assert sum(len(p) for p in passages) <= 83


def test_split_pools_shrinks_train_when_data_is_short() -> None:
    notes: list[str] = []
    groups = [i // 3 for i in range(30)]  # 10 groups of 3
    train, dev, test = split_pools(groups, SplitSizes(train=100, dev=6, test=9), seed=0, notes=notes)
    assert (len(train), len(dev), len(test)) == (15, 6, 9)
    assert {g for g in np.array(groups)[train]}.isdisjoint({g for g in np.array(groups)[test]})
    assert any("train pool has only 15" in n for n in notes)


# ----------------------------------------------------------------------------------------------------- errors


def _copy_task(shared: Path, tmp_path: Path, folder: str) -> Path:
    shutil.copytree(shared / folder, tmp_path / folder)
    for f in (tmp_path / folder).iterdir():
        f.chmod(0o644)
    (tmp_path / folder).chmod(0o755)
    return tmp_path / folder


def test_missing_folder_and_file_name_the_path(tmp_path: Path, shared_data_dir: Path) -> None:
    task = _task("rte")
    with pytest.raises(L2ZOError, match=r"RTE does not exist.*val\.jsonl"):
        task.load(tmp_path, task.default_sizes, 0)
    folder = _copy_task(shared_data_dir, tmp_path, "RTE")
    (folder / "train.jsonl").unlink()
    with pytest.raises(L2ZOError, match=r"no train file in .*RTE.*train\.jsonl"):
        task.load(tmp_path, task.default_sizes, 0)


def test_empty_split_is_an_error(tmp_path: Path, shared_data_dir: Path) -> None:
    folder = _copy_task(shared_data_dir, tmp_path, "CB")
    (folder / "val.jsonl").write_text("\n")
    with pytest.raises(L2ZOError, match="empty split"):
        _task("cb").load(tmp_path, SplitSizes(10, 5, 5), 0)


def test_missing_template_field_names_field_file_and_record(tmp_path: Path, shared_data_dir: Path) -> None:
    folder = _copy_task(shared_data_dir, tmp_path, "RTE")
    lines = (folder / "val.jsonl").read_text().splitlines()
    rec = json.loads(lines[1])
    del rec["hypothesis"]
    lines[1] = json.dumps(rec)
    (folder / "val.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(L2ZOError, match=r"val\.jsonl line 2: the rte template needs the field 'hypothesis'"):
        _task("rte").load(tmp_path, SplitSizes(10, 5, 1000), 0)


def test_hub_failure_says_to_pass_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(L2ZOError, match=r"could not load super_glue/rte .*--data-dir"):
        load_hub(_task("rte").spec)
