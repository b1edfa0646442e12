"""Bad inputs: each gets one line that names the problem and the fix, exit status 2, and no run folder.

Every check runs before the run folder is created, so a refusal never leaves a half-made folder that
would block the corrected rerun. The probes are those of issue 12 ("Tracebacks instead of the promised
one-line error"), run the way a user would, through the CLI entry point, on the shipped tiny world.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from l2zo.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
ARTIFACT = ROOT / "checkpoints" / "tiny" / "zo-finetuner"
SMALL = ["--model", "tiny", "--task", "synth-color", "--steps", "2", "--num-train", "32", "--num-dev", "16",
         "--num-test", "16", "--batch-size", "8", "--max-length", "64", "--no-progress"]  # fmt: skip
META_SMALL = ["--model", "tiny", "--tasks", "synth-sentiment,synth-parity", "--num-train", "24", "--num-dev", "8",
              "--batch-size", "4", "--max-length", "40", "--no-progress"]  # fmt: skip


def refused(capsys: pytest.CaptureFixture[str], argv: list[str], *expected: str) -> str:
    """Run the CLI; assert exit 2 and a single stderr line that starts like every l2zo error and names ``expected``."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("l2zo: error: ") and err.count("\n") == 1, err
    for text in expected:
        assert text in err, err
    return err


def _finetune(capsys: pytest.CaptureFixture[str], logdir: Path, *args: str, expected: tuple[str, ...]) -> None:
    refused(capsys, ["finetune", *SMALL, "--logdir", str(logdir), *args], *expected)
    assert not logdir.exists()  # nothing half-made blocks the corrected rerun


# ----------------------------------------------------------------------------------------- text files


def test_task_file_that_is_not_utf8(tmp_path, capsys):
    task = tmp_path / "latin1.yaml"
    task.write_bytes('name: caf\xe9\ntemplate: "{text} was"\n'.encode("latin-1"))
    _finetune(capsys, tmp_path / "run", "--task", str(task), expected=(str(task), "not UTF-8", "save it as UTF-8"))


def test_data_file_of_a_yaml_task_that_is_not_utf8(tmp_path, capsys):
    (tmp_path / "train.jsonl").write_bytes(b'{"text": "caf\xe9 au lait", "label": "hot"}\n')
    (tmp_path / "test.jsonl").write_text('{"text": "ice", "label": "cold"}\n')
    task = tmp_path / "drinks.yaml"
    task.write_text('name: drinks\ntemplate: "{text} is"\nverbalizer: {cold: " cold", hot: " hot"}\nlabel_field: label\n'
                    "data: {train: train.jsonl, test: test.jsonl}\n")  # fmt: skip
    _finetune(capsys, tmp_path / "run", "--task", str(task), expected=("train.jsonl", "not UTF-8"))


def test_glue_data_file_that_is_not_utf8(tmp_path, capsys):
    cb = tmp_path / "data" / "CB"
    cb.mkdir(parents=True)
    row = {"premise": "It rained.", "hypothesis": "It was wet.", "label": "entailment", "idx": 0}
    (cb / "val.jsonl").write_text(json.dumps(row) + "\n")
    (cb / "train.jsonl").write_bytes(json.dumps(row).replace("rained", "r\xe4ined").encode("latin-1") + b"\n")
    _finetune(capsys, tmp_path / "run", "--task", "cb", "--data-dir", str(tmp_path / "data"),
              expected=(str(cb / "train.jsonl"), "not UTF-8"))  # fmt: skip


# ------------------------------------------------------------------------------------------ run folders


def test_logdir_that_is_a_file(tmp_path, capsys):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    refused(capsys, ["finetune", *SMALL, "--logdir", str(afile)], "is a file, not a folder")
    assert afile.read_text() == "mine"
    refused(capsys, ["finetune", *SMALL, "--logdir", str(afile / "run")], "cannot be created", "is a file")


def test_unwritable_logdir(tmp_path, capsys):
    if os.geteuid() == 0:  # root writes through permission bits; procfs refuses everyone
        target = Path("/proc") / f"l2zo-test-{os.getpid()}" / "run"
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        target = locked / "run"
    refused(capsys, ["finetune", *SMALL, "--logdir", str(target)], "is not writable", "pick a folder you can write to")
    assert not target.exists()


# ------------------------------------------------------------------------------------- device, batch size


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu(tmp_path, capsys):
    _finetune(capsys, tmp_path / "run", "--device", "cuda", expected=("--device cuda", "--device cpu"))


def test_batch_larger_than_the_train_set_is_refused_not_capped(tmp_path, capsys):
    """Refused (not capped): a capped batch would make summary.json report a batch size that never ran."""
    _finetune(capsys, tmp_path / "run", "--batch-size", "100",
              expected=("--batch-size 100 is larger than the 32 training examples", "--num-train"))  # fmt: skip
    logdir = tmp_path / "meta"
    refused(capsys, ["meta-train", *META_SMALL, "--batch-size", "30", "--steps", "1", "--logdir", str(logdir),
                     "--output", str(tmp_path / "art")], "--batch-size 30 is larger than the 24 training examples")  # fmt: skip
    assert not logdir.exists()


# ------------------------------------------------------------------------------------------- artifacts


def _artifact_copy(tmp_path: Path) -> Path:
    art = tmp_path / "art"
    shutil.copytree(ARTIFACT, art)
    return art


def _manifest(art: Path) -> dict:
    return json.loads((art / "l2zo_artifact.json").read_text())


def test_artifact_weights_not_safetensors_but_sha_matches(tmp_path, capsys):
    import hashlib

    art = _artifact_copy(tmp_path)
    garbage = b"\x00not a safetensors file\xff" * 50
    (art / "variance_net.safetensors").write_bytes(garbage)
    manifest = _manifest(art)
    manifest["weights_sha256"] = hashlib.sha256(garbage).hexdigest()  # re-hashed: the sha check passes
    (art / "l2zo_artifact.json").write_text(json.dumps(manifest))
    _finetune(capsys, tmp_path / "run", "--optimizer", "learned", "--artifact", str(art),
              expected=("variance_net.safetensors is not a valid variance net", "re-export the artifact"))  # fmt: skip
    refused(capsys, ["compare", *SMALL, "--optimizers", f"mezo,learned={art}", "--logdir", str(tmp_path / "cmp")],
            "--optimizers item 'learned'", "not a valid variance net")  # fmt: skip
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda m: [m], "is not a JSON object but a list"),
        (lambda m: {k: v for k, v in m.items() if k != "net"}, "lacks or mistypes the key(s) net"),
        (lambda m: {**m, "base_model": {**m["base_model"], "blocks": None}}, "base_model.blocks"),
        (lambda m: {**m, "normalization": "numel"}, "key(s) normalization"),
    ],
)
def test_artifact_manifest_not_an_object_or_missing_keys(tmp_path, capsys, edit, expected):
    art = _artifact_copy(tmp_path)
    (art / "l2zo_artifact.json").write_text(json.dumps(edit(_manifest(art))))
    _finetune(capsys, tmp_path / "run", "--optimizer", "learned", "--artifact", str(art), expected=(expected,))
    refused(capsys, ["inspect", str(art)], expected)


# ----------------------------------------------------------------------------------- meta-train --resume


@pytest.fixture(scope="module")
def meta_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-step meta-train run of the tiny model: its run folder (checkpoints/last.ckpt)."""
    root = tmp_path_factory.mktemp("meta")
    assert main(["meta-train", *META_SMALL, "--steps", "2", "--checkpoint-every", "1", "--logdir", str(root / "run"),
                 "--output", str(root / "art")]) == 0  # fmt: skip
    return root / "run"


def test_truncated_meta_train_checkpoint(meta_run, tmp_path, capsys):
    ckpt = meta_run / "checkpoints" / "last.ckpt"
    data = ckpt.read_bytes()
    truncated = tmp_path / "last.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    logdir = tmp_path / "run"
    refused(capsys, ["meta-train", "--config", str(meta_run / "config.yaml"), "--resume", str(truncated),
                     "--logdir", str(logdir), "--output", str(tmp_path / "art")],
            f"cannot read the checkpoint {truncated}", "truncated")  # fmt: skip
    assert not logdir.exists() and not (tmp_path / "art").exists()


def test_meta_train_resume_refuses_another_config_naming_the_keys(meta_run, tmp_path, capsys):
    ckpt = meta_run / "checkpoints" / "last.ckpt"
    before = sorted(p.name for p in meta_run.iterdir())
    err = refused(capsys, ["meta-train", "--config", str(meta_run / "config.yaml"), "--resume", str(ckpt),
                           "--meta-lr", "0.1", "--seed", "3", "--tasks", "synth-sentiment", "--steps", "4",
                           "--output", str(tmp_path / "art")], "the config differs from the checkpoint's")  # fmt: skip
    assert "meta_lr: 0.001 in the checkpoint, 0.1 now" in err and "seed: 0 in the checkpoint, 3 now" in err
    assert "tasks:" in err and "steps:" not in err  # the step budget may change
    assert sorted(p.name for p in meta_run.iterdir()) == before
