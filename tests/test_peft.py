"""PEFT adapters (``--peft lora|prefix|prompt``): ZO moves the adapter only, the saved adapter reloads with peft,
prefix and prompt tuning train, MeZO's per-scheme defaults, artifact binding, compare's side-by-side runs, and
one-line errors for bad options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from l2zo.cli.main import main
from l2zo.compare.run import hparams_that_run, make_plan
from l2zo.compare.spec import CompareConfig
from l2zo.config import DataArgs, FinetuneConfig, PeftArgs
from l2zo.engine import block_kind, eval_mode, partition
from l2zo.errors import L2ZOError
from l2zo.learned import NetSpec, VarianceNet, save_artifact
from l2zo.models import load_model
from l2zo.models.adapters import apply_peft
from l2zo.optim import build_optimizer
from l2zo.optim.registry import get_optimizer_spec
from l2zo.optim.run_hparams import optimizer_hparams
from l2zo.tasks.loading import load_task_data
from l2zo.tasks.scoring import CandidateScorer
from tests.helpers import tiny_llama

SMALL = ["--num-train", "16", "--num-dev", "8", "--num-test", "8", "--batch-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def negation() -> tuple[CandidateScorer, object, str]:
    """The tiny model's tokenizer scorer, 8 synth-negation training examples (the tiny model is at chance there)
    and the task's loss kind."""
    task, data = load_task_data(DataArgs(task="synth-negation", num_train=16, num_dev=4, num_test=1))
    scorer = CandidateScorer(load_model("tiny").tokenizer, max_length=64)
    return scorer, data.train[:8], task.loss_kind


def _split(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base weights, adapter weights), cloned: the frozen and the trainable tensors."""
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return base, adapter


def _zo_steps(model: torch.nn.Module, scorer, examples, loss_kind: str, steps: int, **hp) -> list[float]:
    batch = scorer.collate(examples)
    opt = build_optimizer("mezo", model, seed=0, **hp)
    losses = [float(opt.step(lambda: scorer.loss(model, batch, loss_kind))) for _ in range(steps)]
    with torch.no_grad():
        losses.append(float(scorer.loss(model, batch, loss_kind)))
    return losses


def test_lora_moves_only_the_adapter_lowers_the_loss_and_reloads_with_peft(negation, tmp_path):
    scorer, examples, loss_kind = negation
    adapted = apply_peft(load_model("tiny").model, PeftArgs(peft="lora"), seed=0)
    model = adapted.model
    blocks = partition(model)
    assert blocks and all(".lora_A." in b.name or ".lora_B." in b.name for b in blocks)
    assert {b.name.split(".")[-4] for b in blocks} == {"q_proj", "v_proj"}  # peft's default for Llama
    assert {block_kind(b.name) for b in blocks} == {"q_proj.lora_A", "q_proj.lora_B", "v_proj.lora_A", "v_proj.lora_B"}
    base0, adapter0 = _split(model)
    losses = _zo_steps(model, scorer, examples, loss_kind, steps=12, lr=0.5, eps=1e-2)
    base1, adapter1 = _split(model)
    assert base1.keys() == base0.keys() and all(torch.equal(base0[n], base1[n]) for n in base0)
    assert all(not torch.equal(adapter0[n], adapter1[n]) for n in adapter0 if ".lora_B." in n)
    assert losses[-1] < losses[0] - 0.01, losses

    adapted.save(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    reloaded = PeftModel.from_pretrained(load_model("tiny").model, str(tmp_path / "adapter")).eval()
    batch = scorer.collate(examples)
    with torch.no_grad():
        mine = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        theirs = reloaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.equal(mine, theirs)


def test_lora_dropout_is_live_in_training_and_off_in_the_probes(negation):
    scorer, examples, loss_kind = negation
    model = apply_peft(load_model("tiny").model, PeftArgs(peft="lora", peft_dropout=0.5), seed=0).model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    batch = scorer.collate(examples[:2])
    model.train()
    with torch.no_grad():
        assert not torch.equal(scorer.loss(model, batch, loss_kind), scorer.loss(model, batch, loss_kind))
        with eval_mode(model):  # what ZOOptimizer.step runs the probes under
            assert torch.equal(scorer.loss(model, batch, loss_kind), scorer.loss(model, batch, loss_kind))
    assert model.training  # the mode comes back


@pytest.mark.parametrize("scheme", ["prefix", "prompt"])
def test_prefix_and_prompt_tuning_train_the_virtual_tokens_only(negation, scheme):
    scorer, examples, loss_kind = negation
    model = apply_peft(load_model("tiny").model, PeftArgs(peft=scheme, peft_virtual_tokens=3), seed=0).model
    assert [b.shape[0] for b in partition(model)] == [3]  # one block: the virtual tokens
    # Left padding leaves each sequence's score as it is alone (the virtual tokens keep their positions).
    with torch.no_grad():
        together = scorer.candidate_scores(model, scorer.collate(examples[:4]))
        alone = torch.cat([scorer.candidate_scores(model, scorer.collate([ex])) for ex in examples[:4]])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    base0, adapter0 = _split(model)
    losses = _zo_steps(model, scorer, examples, loss_kind, steps=3, lr=1e-2, eps=1e-1)
    base1, adapter1 = _split(model)
    assert all(torch.equal(base0[n], base1[n]) for n in base0)
    assert all(not torch.equal(adapter0[n], adapter1[n]) for n in adapter0)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_finetune_lora_uses_mezo_lora_defaults_and_saves_the_adapter(tmp_path):
    logdir = tmp_path / "lora"
    argv = ["finetune", "--model", "tiny", "--task", "synth-negation", "--steps", "2", "--eval-every", "2",
            "--peft", "lora", "--peft-rank", "4", "--lr", "1e-3", "--save-model",
            "--logdir", str(logdir), *SMALL]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["status"] == "ok"
    assert summary["peft"]["peft"] == "lora" and summary["peft"]["r"] == 4
    assert summary["peft"]["target_modules"] == ["q_proj", "v_proj"]
    assert summary["hparams"]["lr"] == 1e-3 and summary["hparams"]["eps"] == 1e-2  # given lr kept; LoRA's eps
    saved = logdir / "model"
    assert (saved / "adapter_config.json").is_file() and not (saved / "model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(load_model("tiny").model, str(saved))
    lora_b = [p for n, p in reloaded.named_parameters() if ".lora_B." in n]
    assert lora_b and any(bool(p.abs().sum() > 0) for p in lora_b)  # trained: B starts at zero


def test_mezo_scheme_defaults_only_where_mezo_defaults_apply():
    def hp(optimizer: str, scheme: str, **kw) -> dict:
        cfg = FinetuneConfig(optimizer=optimizer, adapter=PeftArgs(peft=scheme), **kw)
        return optimizer_hparams(cfg, get_optimizer_spec(optimizer))

    assert "lr" not in hp("mezo", "none") and "eps" not in hp("mezo", "none")
    assert (hp("mezo", "lora")["lr"], hp("mezo", "lora")["eps"]) == (1e-4, 1e-2)
    assert (hp("learned-random", "prefix")["lr"], hp("learned-random", "prefix")["eps"]) == (1e-2, 1e-1)
    assert (hp("mezo", "prompt")["lr"], hp("mezo", "prompt")["eps"]) == (1e-2, 1e-1)
    assert hp("mezo", "lora", eps=5e-3)["eps"] == 5e-3  # what the user gives wins
    for own in ("zo-adam", "fo-sgd"):  # their published defaults are their own, not MeZO's
        assert "lr" not in hp(own, "lora") and "eps" not in hp(own, "lora")


def _save_artifact(path: Path, model: torch.nn.Module) -> None:
    blocks = partition(model)
    base = {"name": "tiny-llama", "revision": "r1"}
    adapter = getattr(model, "l2zo_adapter", None)
    save_artifact(path, VarianceNet(NetSpec(), [b.name for b in blocks], seed=3), blocks,
                  base_model={**base, **({"adapter": adapter} if adapter else {})},
                  meta_config={}, meta_record={"steps": 1},
                  normalization={"rule": "numel", "batch_size": 8})  # fmt: skip


def test_artifacts_bind_to_full_fine_tuning_or_to_their_adapter(tmp_path):
    full_art, lora_art = tmp_path / "full", tmp_path / "lora"
    _save_artifact(full_art, tiny_llama())
    lora = apply_peft(tiny_llama(), PeftArgs(peft="lora", peft_rank=4), seed=0).model
    _save_artifact(lora_art, lora)
    assert json.loads((lora_art / "l2zo_artifact.json").read_text())["base_model"]["adapter"]["r"] == 4

    build_optimizer("learned", lora, artifact=str(lora_art))  # the same base model and layout: loads
    build_optimizer("learned", tiny_llama(), artifact=str(full_art))
    with pytest.raises(L2ZOError, match=r"meta-trained for full fine-tuning .*this run uses a lora adapter .*run "
                       r"without --peft, or meta-train an artifact with --peft lora --peft-rank 4"):  # fmt: skip
        build_optimizer("learned", lora, artifact=str(full_art))
    with pytest.raises(L2ZOError, match=r"meta-trained for a lora adapter \(r=4 on q_proj,v_proj\).*this run uses "
                       r"full fine-tuning: run with --peft lora --peft-rank 4 "
                       r"--peft-target-modules q_proj,v_proj"):  # fmt: skip
        build_optimizer("learned", tiny_llama(), artifact=str(lora_art))
    other_rank = apply_peft(tiny_llama(), PeftArgs(peft="lora", peft_rank=2), seed=0).model
    with pytest.raises(L2ZOError, match=r"this run trains a lora adapter \(r=2 on q_proj,v_proj\): run with --peft "
                       r"lora --peft-rank 4"):  # fmt: skip
        build_optimizer("learned", other_rank, artifact=str(lora_art))
    other_base = apply_peft(tiny_llama(hidden=32), PeftArgs(peft="lora", peft_rank=4), seed=0).model
    with pytest.raises(L2ZOError, match="a base model of another architecture"):
        build_optimizer("learned", other_base, artifact=str(lora_art))
    prefix = apply_peft(tiny_llama(), PeftArgs(peft="prefix"), seed=0).model
    with pytest.raises(L2ZOError, match="meta-trained for a lora adapter .* this run uses a prefix adapter"):
        build_optimizer("learned", prefix, artifact=str(lora_art))


def test_compare_puts_full_fine_tuning_and_lora_side_by_side(tmp_path):
    data = DataArgs(model="tiny", task="synth-negation", num_train=16, num_dev=8, num_test=8, batch_size=8)
    cfg = CompareConfig(data=data, optimizers="mezo,mezo:peft=lora:peft_rank=4", steps=2, logdir=str(tmp_path))
    plan = make_plan(cfg)
    assert [s.label for s in plan.specs] == ["mezo", "mezo@peft=lora,peft_rank=4"]
    full, lora = (plan.finetune_config(s, 0) for s in plan.specs)
    assert not full.adapter.enabled and full.opt_args == {}
    assert lora.adapter == PeftArgs(peft="lora", peft_rank=4) and lora.opt_args == {}
    assert (hparams_that_run(full)["lr"], hparams_that_run(lora)["lr"]) == (1e-6, 1e-4)
    with pytest.raises(L2ZOError, match=r"--optimizers item 'mezo': --peft-rank must be positive, got 0"):
        make_plan(CompareConfig(data=data, optimizers="mezo:peft=lora:peft_rank=0", steps=2, logdir=str(tmp_path)))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--peft", "lora", "--peft-rank", "0"], "--peft-rank must be positive, got 0"),
        (["--peft", "adalora"], "bad --peft 'adalora'; valid choices: none, lora, prefix, prompt"),
        (["--peft", "lora", "--peft-dropout", "1.5"], r"--peft-dropout must be in \[0, 1\), got 1.5"),
        (["--peft", "prompt", "--peft-virtual-tokens", "0"], "--peft-virtual-tokens must be positive"),
        (
            ["--peft", "lora", "--peft-target-modules", "q_proj,attn_qkv"],
            "bad --peft-target-modules 'attn_qkv': no module of this model is named so; its layers with a weight "
            "matrix: down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj",
        ),
    ],
)
def test_bad_peft_options_are_one_line_errors(tmp_path, capsys, argv, message):
    import re

    logdir = tmp_path / "e"
    rc = main(["finetune", "--model", "tiny", "--task", "synth-negation", "--steps", "1", "--logdir", str(logdir),
               *SMALL, *argv])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("l2zo: error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not logdir.exists()
