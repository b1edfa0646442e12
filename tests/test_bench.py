"""`l2zo bench`: the record's structure and ratios, a memory measurement in a fresh process, the CLI.

No speed assertions: figures are judged in BENCHMARKS.md, not by pytest.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from l2zo.bench import BenchConfig, run_bench
from l2zo.bench.memory import measure_in_subprocess
from l2zo.bench.workload import build_workload
from l2zo.cli.main import main
from l2zo.errors import L2ZOError


def test_batch_has_the_exact_shape_asked_for() -> None:
    wl = build_workload(BenchConfig(model="tiny", batch_size=5, seq_len=40))
    assert tuple(wl.batch.input_ids.shape) == (10, 40) and bool(wl.batch.attention_mask.all())
    with torch.no_grad():
        assert wl.task == "synth-sentiment" and float(wl.loss()) > 0


def test_record_has_every_ratio_for_every_row() -> None:
    cfg = BenchConfig(model="tiny", batch_size=4, seq_len=24, steps=2, warmup=0, memory=False, cache_z=True,
                      optimizers=["mezo", "learned", "zo-adam", "fo-adam"])  # fmt: skip
    rec = run_bench(cfg, log=lambda *_: None)
    rows = rec["rows"]
    assert list(rows) == [
        "inference",
        "mezo",
        "learned",
        "zo-adam",
        "fo-adam",
        "mezo+cache-z",
        "mezo+table",
        "mezo+table+two-pass",
        "learned+table",
        "mezo-reference",
        "z-pass",
        "z-pass-1thread",
        "z-pass-table",
    ]
    for name in ("mezo", "learned", "zo-adam", "mezo+cache-z", "mezo+table+two-pass", "learned+table"):
        r = rows[name]
        assert r["step_over_2fwd"] == pytest.approx(r["median_s"] / (2 * rows["inference"]["median_s"]))
        assert r["speedup_over_reference"] == pytest.approx(rows["mezo-reference"]["median_s"] / r["median_s"])
        assert len(r["times_s"]) == 2
    assert "step_over_2fwd" not in rows["fo-adam"] and rows["fo-adam"]["kind"] == "first-order"
    assert rows["learned"]["note"] == ""  # tiny has a shipped artifact: the real net is timed
    assert rec["machine"]["torch"] and rec["model_params"] > 0


def test_memory_is_measured_in_a_fresh_process() -> None:
    cfg = BenchConfig(model="tiny", batch_size=4, seq_len=24, memory_steps=1)
    out = measure_in_subprocess(cfg, "inference")
    assert out["peak_mb"] >= 0 and out["baseline_mb"] > 0


def test_cli_writes_the_json(tmp_path, capsys) -> None:
    path = tmp_path / "out.json"
    rc = main(["bench", "--model", "tiny", "--batch-size", "2", "--seq-len", "16", "--steps", "1", "--warmup", "0",
               "--optimizers", "mezo", "--no-memory", "--no-reference", "--no-profile", "--no-z-paths",
               "--json", str(path)])  # fmt: skip
    assert rc == 0
    rec = json.loads(path.read_text())
    assert set(rec["rows"]) == {"inference", "mezo"} and "step_over_2fwd" in rec["rows"]["mezo"]
    assert "| mezo |" in capsys.readouterr().out


def test_a_row_names_how_it_draws_z() -> None:
    """NAME+table, NAME+two-pass, NAME+cache-z: the row's optimizer runs with those options; a method that cannot
    take one is refused, as is an unknown suffix."""
    cfg = BenchConfig(model="tiny", batch_size=2, seq_len=16, steps=1, warmup=0, memory=False, reference=False,
                      profile=False, z_paths=False, optimizers=["mezo+two-pass", "learned+cache-z"])  # fmt: skip
    rows = run_bench(cfg, log=lambda *_: None)["rows"]
    assert "two passes" in rows["mezo+two-pass"]["note"] and "once per step" in rows["learned+cache-z"]["note"]
    with pytest.raises(L2ZOError, match="--two-pass ignored: LearnedZO"):
        run_bench(dataclasses.replace(cfg, optimizers=["learned+two-pass"]), log=lambda *_: None)
    with pytest.raises(L2ZOError, match="unknown bench row variant 'fast'"):
        run_bench(dataclasses.replace(cfg, optimizers=["mezo+fast"]), log=lambda *_: None)


def test_bad_input_is_named() -> None:
    with pytest.raises(L2ZOError, match="unknown optimizer 'nope'"):
        BenchConfig(optimizers=["nope"])
    with pytest.raises(L2ZOError, match="--seq-len"):
        BenchConfig(seq_len=4)
