"""The config layer: dataclasses served by jsonargparse, one shared DataArgs, one way to read values."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from l2zo.cli.main import build_parser, main
from l2zo.compare.spec import CompareConfig, parse_optimizers
from l2zo.config import DataArgs, FinetuneConfig, ZArgs, config_to_dict, parse_scalar
from l2zo.config.checks import field_types
from l2zo.config.parser import build_config, from_namespace
from l2zo.errors import L2ZOError
from l2zo.learned.meta_config import MetaTrainConfig
from l2zo.optim.registry import get_optimizer_spec
from l2zo.optim.run_hparams import coerce_hparams, optimizer_hparams

REPO = Path(__file__).resolve().parents[1]
ARTIFACT = REPO / "checkpoints" / "tiny" / "zo-finetuner"
KNOWN = ["mezo", "zo-adam", "learned"]


def test_scalars_are_read_one_way():
    assert parse_scalar("1e-4") == 1e-4 and isinstance(parse_scalar("1e-4"), float)
    assert parse_scalar("5E3") == 5000.0 and parse_scalar("3") == 3 and parse_scalar("true") is True
    assert parse_scalar("[1, 2]") == [1, 2] and parse_scalar("x") == "x" and parse_scalar("a: b") == "a: b"


def test_opt_args_and_optimizers_read_1e_4_as_the_same_float():
    """The bug: --opt-args eps=1e-4 gave the string '1e-4' (YAML 1.1), --optimizers mezo:eps=1e-4 a float."""
    cfg = build_config(FinetuneConfig, overrides={"opt_args": "eps=1e-4,lr=2e-5"})
    hp = optimizer_hparams(cfg, get_optimizer_spec("mezo"))
    (spec,) = parse_optimizers("mezo:eps=1e-4:lr=2e-5", KNOWN, {})
    assert hp["eps"] == spec.hparams["eps"] == 1e-4 and hp["lr"] == spec.hparams["lr"] == 2e-5
    assert isinstance(hp["eps"], float) and isinstance(spec.hparams["eps"], float)


def test_opt_args_eps_runs_end_to_end(tmp_path, capsys):
    logdir = tmp_path / "run"
    rc = main(["finetune", "--task", "synth-sentiment", "--opt-args", "eps=1e-4", "--steps", "1", "--eval-every", "1",
               "--num-train", "16", "--num-dev", "8", "--num-test", "8", "--batch-size", "4", "--no-progress",
               "--logdir", str(logdir)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert json.loads((logdir / "summary.json").read_text())["hparams"]["eps"] == 1e-4


@dataclasses.dataclass
class _Hparams:  # the shape of an optimizer's hyperparameter dataclass (OptimizerSpec.hparams)
    lr: float = 1e-6
    num_directions: int = 8
    normalization: str = "numel"


def test_hparams_are_typed_by_the_optimizers_dataclass():
    out = coerce_hparams("fzoo", _Hparams, {"lr": "1e-4", "num_directions": "4", "normalization": "paper", "x": "2"})
    assert out == {"lr": 1e-4, "num_directions": 4, "normalization": "paper", "x": 2}
    with pytest.raises(L2ZOError, match=r"^bad value for lr of optimizer 'fzoo': 'abc' is not a valid float$"):
        coerce_hparams("fzoo", _Hparams(), {"lr": "abc"})
    with pytest.raises(L2ZOError, match=r"num_directions of optimizer 'fzoo': '2.5' is not a valid int"):
        coerce_hparams("fzoo", _Hparams, {"num_directions": 2.5})
    assert coerce_hparams("mezo", None, {"eps": "1e-4", "partial": "true"}) == {"eps": 1e-4, "partial": True}


def _compare_file(tmp_path: Path, name: str, optimizers: object) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"optimizers": optimizers, "model": "tiny", "task": "synth-sentiment",
                                    "num_train": 16, "num_dev": 8, "num_test": 8, "steps": 2}, sort_keys=False))  # fmt: skip
    return path


def test_yaml_list_of_optimizers_gives_the_compact_strings_plan(tmp_path):
    from l2zo.compare.run import make_plan

    compact = f"mezo:lr=1e-5,mezo:lr=1e-4:eps=0.01,learned={ARTIFACT}:lr=1e-4,zo-adam"
    entries = [{"name": "mezo", "lr": 1e-5}, {"name": "mezo", "lr": "1e-4", "eps": 0.01},
               {"name": "learned", "artifact": str(ARTIFACT), "lr": 1e-4}, "zo-adam"]  # fmt: skip
    plans = [make_plan(build_config(CompareConfig, _compare_file(tmp_path, f"{i}.yaml", opts)))
             for i, opts in enumerate((compact, entries))]  # fmt: skip
    a, b = ([(s.label, s.optimizer, s.hparams, p.finetune_config(s, 0)) for s in p.specs] for p in plans)
    assert a == b
    assert [label for label, *_ in a] == ["mezo@lr=1e-05", "mezo@lr=0.0001,eps=0.01", "learned", "zo-adam"]
    assert a[2][3].artifact == str(ARTIFACT) and a[1][2] == {"lr": 1e-4, "eps": 0.01}


def test_an_optimizer_entry_needs_a_name():
    with pytest.raises(L2ZOError, match="needs a name"):
        parse_optimizers([{"lr": 1e-4}], KNOWN, {})


def test_data_args_are_one_nested_config_reused_by_every_command(tmp_path):
    from l2zo.compare.run import Plan

    for cls in (FinetuneConfig, CompareConfig, MetaTrainConfig):
        assert field_types(cls)["data"] is DataArgs
    cfg = build_config(CompareConfig, overrides={"model": "tiny", "batch_size": 4, "steps": 3, "cache_z": True})
    base = FinetuneConfig(data=cfg.data, steps=cfg.steps, zo=cfg.zo)
    plan = Plan(cfg=cfg, specs=parse_optimizers("mezo:lr=1e-4", KNOWN, {}), seeds=[0], sweep_points=[], base=base)
    run = plan.finetune_config(plan.specs[0], seed=5)
    assert run.data is cfg.data and run.steps == 3 and run.zo.cache_z and run.seed == 5 and run.opt_args == {"lr": 1e-4}
    # Flat keys (the layout of the flags) and nested ones load the same config.
    flat, nested = tmp_path / "flat.yaml", tmp_path / "nested.yaml"
    flat.write_text("model: tiny\nbatch-size: 4\nnum_dev: 8\nsteps: 3\n")
    nested.write_text("data: {model: tiny, batch_size: 4, num-dev: 8}\nsteps: 3\n")
    assert build_config(FinetuneConfig, flat) == build_config(FinetuneConfig, nested)
    # Each command keeps its own defaults for the shared fields; meta-train has no --task of its own.
    assert build_config(MetaTrainConfig).data == DataArgs(num_train=500, num_dev=100, num_test=1, max_length=128,
                                                          device="cpu")  # fmt: skip
    assert build_config(CompareConfig).data.num_train == 1000 and build_config(FinetuneConfig).data.num_train is None
    with pytest.raises(L2ZOError, match="unknown override key 'task'"):
        build_config(MetaTrainConfig, overrides={"task": "sst2"})


@pytest.mark.parametrize("cls", [FinetuneConfig, CompareConfig, MetaTrainConfig])
def test_a_runs_config_yaml_reads_back(tmp_path, cls):
    cfg = build_config(cls, overrides={"model": "tiny-derived", "batch_size": 4, "steps": 7})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert build_config(cls, tmp_path / "config.yaml") == cfg


def test_meta_config_yaml_loads_in_both_layouts(tmp_path):
    flat = build_config(MetaTrainConfig, REPO / "meta_configs" / "tiny.yaml")
    data = yaml.safe_load((REPO / "meta_configs" / "tiny.yaml").read_text())
    shared = {k: data.pop(k) for k in list(data) if k in {f.name for f in dataclasses.fields(DataArgs)}}
    (tmp_path / "nested.yaml").write_text(yaml.safe_dump({**data, "data": shared}))
    assert build_config(MetaTrainConfig, tmp_path / "nested.yaml") == flat
    assert flat.data.model == "tiny" and flat.data.max_length == 64 and flat.tasks[0] == "synth-sentiment"


def _parse(*argv: str) -> object:
    args = build_parser().parse_args(["finetune", *argv])
    return from_namespace(FinetuneConfig, args)


def test_flags_old_and_new_names_and_switches(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("steps: 9\nbatch_size: 2\nprogress: false\ncache_z: true\n")
    cfg = _parse("--steps", "3", "--config", str(cfg_file), "--data.max_length", "64", "--eval_every", "5",
                 "--save-model", "--include", "a,b")  # fmt: skip
    assert cfg.steps == 3 and cfg.data.batch_size == 2 and cfg.data.max_length == 64 and cfg.eval_every == 5
    assert not cfg.progress and cfg.zo.cache_z and cfg.save_model and cfg.include == ["a", "b"]
    cfg = _parse("--config", str(cfg_file), "--progress", "--no-cache-z", "--save-model", "false")
    assert cfg.progress and not cfg.zo.cache_z and not cfg.save_model
    cfg = _parse("--z-source", "table", "--z-table-size", "65536", "--two-pass")
    assert cfg.zo == ZArgs(z_source="table", z_table_size=65536, two_pass=True)
    with pytest.raises(L2ZOError, match="--z-table-size must be at least 1024"):
        _parse("--z-source", "table", "--z-table-size", "100")
    with pytest.raises(L2ZOError, match="drop --cache-z"):
        _parse("--z-source", "table", "--cache-z")
    (tmp_path / "data.yaml").write_text("batch_size: 3\nmodel: tiny-derived\n")  # --data FILE: the data.* keys
    assert _parse("--data", str(tmp_path / "data.yaml")).data == DataArgs(model="tiny-derived", batch_size=3)


def test_a_data_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    (tmp_path / "data.yaml").write_bytes(b"model: caf\xe9\n")
    assert main(["finetune", "--data", str(tmp_path / "data.yaml")]) == 2
    err = capsys.readouterr().err
    assert err == "l2zo: error: a file on the command line is not UTF-8 text (invalid continuation byte at offset 10)\n"


@pytest.mark.parametrize(
    ("command", "flag", "text"),
    [
        ("finetune", "--batch-size", "training examples per step"),
        ("finetune", "--opt-args", "other optimizer hyperparameters"),
        ("compare", "--select", "sweep and lr-tuning selection: 'final' or 'best' dev loss"),
        ("meta-train", "--p-teacher", "probability that a trajectory step is the first-order teacher's"),
        ("bench", "--seq-len", "tokens per sequence"),
    ],
)
def test_help_comes_from_the_field_docstrings(capsys, command, flag, text):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert flag in out and text in out


BAD_FILES = {
    "unknown_key": (b"model: tiny\nlearning_rate: 0.1\n", "unknown config key 'learning_rate'; valid keys: model, "),
    "wrong_type": (b"batch_size: many\n", "bad value for --batch-size: 'many' is not a valid int"),
    "bad_choice": (b"precision: fp8\n", "bad --precision 'fp8'; valid choices: 32, bf16-mixed"),
    "not_utf8": (b"model: tiny\ntask: caf\xe9\n", "is not UTF-8 text (bad byte at offset 21); save it as UTF-8"),
    "not_yaml": (b"model: [tiny\n", "is not valid YAML at line 2"),
    "not_a_mapping": (b"- model\n- tiny\n", "must be a mapping of keys to values, not a list"),
    "twice": (b"batch_size: 4\ndata: {batch_size: 8}\n", "config key 'data.batch_size' is given twice"),
}


@pytest.mark.parametrize("case", [*BAD_FILES, "missing"])
def test_bad_config_files_are_one_line(tmp_path, capsys, case):
    path = tmp_path / f"{case}.yaml"
    if case != "missing":
        path.write_bytes(BAD_FILES[case][0])
    logdir = tmp_path / "run"
    rc = main(["finetune", "--config", str(path), "--logdir", str(logdir)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("l2zo: error: ") and err.count("\n") == 1, err
    assert (f"config file not found: {path}" if case == "missing" else BAD_FILES[case][1]) in err
    assert not logdir.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["finetune", "--batch-size", "2.5"], "bad value for --batch-size: '2.5' is not a valid int"),
        (["finetune", "--lr", "fast"], "bad value for --lr: 'fast' is not a valid float or null"),
        (["finetune", "--lr-schedule", "cosine"], "bad --lr-schedule 'cosine'; valid choices: constant, linear"),
        (["finetune", "--learning-rate", "1"], "unrecognized arguments: --learning-rate 1; see `l2zo finetune --help`"),
        (["compare", "--select", "test"], "bad --select 'test'; valid choices: final, best"),
        (
            ["meta-train", "--objective", "x"],
            "bad --objective 'x'; valid choices: greedy, unrolled, expected, distill, es",
        ),
        (["meta-train", "--data.task", "sst2"], "unrecognized arguments: --data.task sst2"),
        (["bench", "--steps", "0"], "--steps must be positive, got 0"),
        (["nope"], "invalid choice: 'nope'"),
    ],
)
def test_bad_flags_are_one_line(tmp_path, capsys, argv, message):
    rc = main([*argv, "--logdir", str(tmp_path / "run")] if argv[0] in ("finetune", "compare") else argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("l2zo: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not (tmp_path / "run").exists()


def test_accelerator_is_lightnings_spelling_of_device():
    from l2zo.config.parser import config_parser, from_namespace

    parser = config_parser(FinetuneConfig)
    cfg = from_namespace(FinetuneConfig, parser.parse_args(["--accelerator", "cpu"]))
    assert cfg.data.device == "cpu"
