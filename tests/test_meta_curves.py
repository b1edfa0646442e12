"""Meta-training curves (l2zo.compare.meta_curves): scalars read back from events written here, and the PNG."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from l2zo.compare.meta_curves import meta_tasks, plot_meta_curves, read_scalars, rolling
from l2zo.errors import L2ZOError
from tests.tb_events import write_scalars

ROOT = Path(__file__).resolve().parents[1]


def f32(x: float) -> float:
    return float(np.float32(x))


@pytest.fixture
def meta_run(tmp_path) -> Path:
    """A meta-train logdir killed after step 5 and resumed from step 3: two events files, steps 3-5 twice."""
    run = tmp_path / "meta-train"
    first = {"meta/loss/sst2": [(s, 1.0 + s) for s in range(6)], "train/loss/sst2": [(s, 2.0 + s) for s in range(6)],
             "meta/loss/copa": [(s, 3.0) for s in range(6)], "meta/c": [(s, 5.0 - s) for s in range(6)],
             "meta/sigma_mean": [(s, 0.9) for s in range(6)]}  # fmt: skip
    resumed = {"meta/loss/sst2": 0.5, "meta/loss/copa": 2.5, "meta/c": 1.0, "meta/sigma_mean": 0.6}
    write_scalars(run, first)
    write_scalars(run, {tag: [(s, v) for s in range(3, 8)] for tag, v in resumed.items()})
    return run


def test_read_scalars_merges_event_files_and_keeps_the_latest_value(meta_run):
    sc = read_scalars(meta_run)
    assert len(list(meta_run.glob("events.out.tfevents.*"))) == 2
    assert set(sc) == {"meta/loss/sst2", "train/loss/sst2", "meta/loss/copa", "meta/c", "meta/sigma_mean"}
    assert sc["meta/loss/sst2"] == {0: 1.0, 1: 2.0, 2: 3.0, 3: 0.5, 4: 0.5, 5: 0.5, 6: 0.5, 7: 0.5}
    assert sc["train/loss/sst2"] == {s: 2.0 + s for s in range(6)}  # only the first run logged it
    assert sc["meta/sigma_mean"] == {s: f32(0.9) if s < 3 else f32(0.6) for s in range(8)}
    assert meta_tasks(sc) == ["copa", "sst2"]


def test_read_scalars_finds_events_in_subfolders(tmp_path):
    write_scalars(tmp_path / "run" / "version_0", {"meta/c": [(0, 2.0)]})
    assert read_scalars(tmp_path / "run") == {"meta/c": {0: 2.0}}


def test_a_folder_without_events_is_a_one_line_error(tmp_path):
    with pytest.raises(L2ZOError, match=r"no TensorBoard event files under .*empty; pass the meta-train --logdir"):
        read_scalars(tmp_path / "empty")


def test_rolling_is_a_trailing_mean():
    assert rolling([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert rolling([1.0, 3.0, 5.0], 10) == [1.0, 2.0, 3.0]  # fewer values than the window: mean so far
    assert rolling([], 3) == []


def test_plot_writes_a_png(meta_run, tmp_path):
    out = tmp_path / "plots" / "meta.png"
    plot_meta_curves(read_scalars(meta_run), out, window=2)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(out).shape
    assert (width, height) == (15 * 110, 4 * 110)  # figsize x dpi
    assert [p.name for p in out.parent.iterdir()] == ["meta.png"]  # no temp file left


def test_script_reads_and_plots(meta_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "meta.png"
    monkeypatch.setattr(sys, "argv", ["plot_meta.py", str(meta_run), str(out), "--window", "3"])
    runpy.run_path(str(ROOT / "scripts" / "plot_meta.py"), run_name="__main__")
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert out.read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setattr(sys, "argv", ["plot_meta.py", str(tmp_path / "nothing"), str(out)])
    with pytest.raises(SystemExit, match="error: no TensorBoard event files under"):
        runpy.run_path(str(ROOT / "scripts" / "plot_meta.py"), run_name="__main__")
