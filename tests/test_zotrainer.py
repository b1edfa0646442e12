"""ZOTrainer and ZOTrainerMixin: zeroth-order steps inside transformers' Trainer, on the shipped tiny model.

Forwards are counted with a forward pre-hook on the model (it also records whether the model was in train mode), so
"two forwards per step" and "dropout off in the probes" are observed, not assumed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from l2zo.errors import L2ZOError
from l2zo.integrations.step_adapter import ZOStepAdapter
from l2zo.integrations.transformers import ZOTrainer, ZOTrainerMixin, parse_zo_optimizer
from l2zo.models import load_model
from l2zo.optim import MeZO, optimizer_specs
from l2zo.optim.methods.learned import LearnedZO

ROOT = Path(__file__).resolve().parents[1]
ARTIFACT = ROOT / "checkpoints" / "tiny" / "zo-finetuner"


def _example_module():  # type: ignore[no-untyped-def]
    """examples/zo_trainer.py, imported from its file: the tests train on the data the README's example uses."""
    spec = importlib.util.spec_from_file_location("zo_trainer_example", ROOT / "examples" / "zo_trainer.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXAMPLE = _example_module()


@pytest.fixture(scope="module", autouse=True)
def one_thread():  # type: ignore[no-untyped-def]
    """One torch thread: the tiny model's forwards are fastest so on a shared machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():  # type: ignore[no-untyped-def]
    loaded = load_model("tiny")
    train = EXAMPLE.sft_examples(loaded.tokenizer, "synth-sentiment", 128, seed=0)
    dev = EXAMPLE.sft_examples(loaded.tokenizer, "synth-sentiment", 32, seed=0, split="dev")
    return loaded, train, dev, EXAMPLE.collate_fn(loaded.tokenizer.pad_token_id)


def fresh_model():  # type: ignore[no-untyped-def]
    return load_model("tiny").model


def training_args(tmp_path: Path, **kw) -> TrainingArguments:  # type: ignore[no-untyped-def]
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=1e-4, lr_scheduler_type="constant",
                logging_steps=5, save_strategy="no", report_to=[], seed=0, use_cpu=True, disable_tqdm=True)  # fmt: skip
    base.update(kw)
    return TrainingArguments(**base)


class ForwardCounter:
    """Counts the model's forwards and records ``model.training`` and the optimizer's step count at each."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.training: list[bool] = []
        self.steps: list[int] = []
        self.opt: MeZO | None = None
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):  # type: ignore[no-untyped-def]
        self.training.append(module.training)
        self.steps.append(-1 if self.opt is None else self.opt.step_count)

    def close(self) -> int:
        self.handle.remove()
        return len(self.training)


def dev_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return float(model(**batch).loss)


def test_mezo_lowers_the_loss_with_two_forwards_a_step_and_no_grad(tiny, tmp_path):
    loaded, train, dev, collate = tiny
    model, steps = fresh_model(), 40
    dev_batch = collate(dev)
    before = dev_loss(model, dev_batch)
    # max_grad_norm stays at its default 1.0: the clipping path must cope with grad-less parameters.
    trainer = ZOTrainer(model=model, args=training_args(tmp_path, max_steps=steps), train_dataset=train,
                        data_collator=collate, zo_optimizer="mezo", zo_args={"eps": 1e-3})  # fmt: skip
    counter = ForwardCounter(model)
    out = trainer.train()
    forwards = counter.close()
    after = dev_loss(model, dev_batch)

    assert isinstance(trainer.zo_optimizer, MeZO)
    assert trainer.zo_optimizer.step_count == steps  # one ZO step per Trainer step: no second, closure-less step
    assert trainer.state.global_step == steps
    assert forwards == 2 * steps
    assert not any(counter.training)  # every probe in eval mode
    assert all(p.grad is None for p in model.parameters())
    assert after < before - 0.2, (before, after)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == steps // 5 and all("projected_grad" in h and "grad_norm" not in h for h in logged)
    assert out.training_loss == pytest.approx(sum(h["loss"] for h in logged) / len(logged), rel=1e-4)


def test_the_learned_optimizer_runs_through_zotrainer(tiny, tmp_path):
    loaded, train, dev, collate = tiny
    model = fresh_model()
    theta0 = [p.detach().clone() for p in model.parameters()]
    trainer = ZOTrainer(model=model, args=training_args(tmp_path, max_steps=4), train_dataset=train,
                        data_collator=collate, zo_optimizer=f"learned={ARTIFACT}:eps=1e-3")  # fmt: skip
    counter = ForwardCounter(model)
    trainer.train()
    opt = trainer.zo_optimizer
    assert isinstance(opt, LearnedZO) and opt.step_count == 4 and counter.close() == 8
    assert opt.last_sigma is not None and torch.isfinite(torch.as_tensor(opt.last_sigma)).all()
    assert opt.seed == 0 and opt.param_groups[0]["lr"] == pytest.approx(1e-4)  # the Trainer's seed and lr
    assert any(not torch.equal(a, p) for a, p in zip(theta0, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_gradient_accumulation_holds_the_seed_across_micro_batches(tiny, tmp_path):
    """k=2 micro-batches of 4 take the step of one batch of 8: one seed, 2 forwards per micro-batch."""
    loaded, train, dev, collate = tiny
    runs = {}
    for name, batch, accum in (("accumulated", 4, 2), ("whole", 8, 1)):
        model = fresh_model()
        args = training_args(tmp_path / name, max_steps=3, per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accum, train_sampling_strategy="sequential")  # fmt: skip
        trainer = ZOTrainer(model=model, args=args, train_dataset=train, data_collator=collate)
        counter = ForwardCounter(model)
        counter.opt = trainer.zo_optimizer
        trainer.train()
        counter.close()
        runs[name] = (model, counter.steps, trainer)
    model_a, steps_a, trainer_a = runs["accumulated"]
    model_w, steps_w, _ = runs["whole"]
    assert trainer_a.zo_optimizer.step_count == 3
    assert steps_a == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]  # both micro-batches of a window probed under one seed
    assert steps_w == [0, 0, 1, 1, 2, 2]
    for pa, pw in zip(model_a.parameters(), model_w.parameters()):
        torch.testing.assert_close(pa, pw, rtol=0, atol=1e-5)  # the same update, to fp32 summation order
    moved = max((pa - p0).abs().max().item() for pa, p0 in zip(model_a.parameters(), fresh_model().parameters()))
    assert moved > 1e-4  # ... and the runs did move


class SmoothedLossTrainer(Trainer):
    """Someone's Trainer subclass: its own compute_loss (label-smoothed, which pops "labels" off the inputs)."""

    loss_calls = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        self.loss_calls += 1
        labels = inputs.pop("labels")
        logits = model(**inputs).logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, label_smoothing=0.1
        )


class ZOSmoothedLossTrainer(ZOTrainerMixin, SmoothedLossTrainer):
    pass


def test_the_mixin_composes_with_another_trainer_subclass(tiny, tmp_path):
    loaded, train, dev, collate = tiny
    model = fresh_model()
    opt = MeZO(model, lr=1e-4, eps=1e-3, seed=5)  # an already built l2zo optimizer, passed the Trainer's way
    trainer = ZOSmoothedLossTrainer(model=model, args=training_args(tmp_path, max_steps=3), train_dataset=train,
                                    data_collator=collate, optimizers=(opt, None))  # fmt: skip
    trainer.train()
    assert trainer.zo_optimizer is opt and opt.step_count == 3
    assert trainer.loss_calls == 6  # the subclass's loss, twice a step, labels intact for the second probe
    assert opt.last_probe is not None and opt.last_probe.loss_plus != opt.last_probe.loss_minus
    assert all(p.grad is None for p in model.parameters())


class LrRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.theta: list[torch.Tensor] = []

    def on_step_begin(self, args, state, control, optimizer=None, model=None, **kwargs):  # type: ignore[no-untyped-def]
        self.lrs.append(float(optimizer.param_groups[0]["lr"]))
        self.theta.append(torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()]))


def test_the_trainers_lr_scheduler_drives_the_zo_lr(tiny, tmp_path):
    loaded, train, dev, collate = tiny
    model = fresh_model()
    recorder = LrRecorder()
    args = training_args(tmp_path, max_steps=4, lr_scheduler_type="linear", warmup_steps=2, learning_rate=1e-4)
    zo = MeZO(model, lr=2e-4, eps=1e-3)  # built: its own lr is the scheduler's base lr (args.learning_rate is not)
    trainer = ZOTrainer(model=model, args=args, train_dataset=train, data_collator=collate, callbacks=[recorder],
                        zo_optimizer=zo)  # fmt: skip
    trainer.train()
    assert trainer.zo_optimizer is zo
    assert recorder.lrs == pytest.approx([0.0, 1e-4, 2e-4, 1e-4])  # warm-up then linear decay, as the ZO step read it
    assert all(g["lr"] == pytest.approx(0.0) for g in zo.param_groups)  # decayed to 0 after the last step
    theta_end = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    # lr 0 at step 0: the probe's perturbations cancel and theta is back (to fp32 rounding); lr > 0 after: it moves.
    torch.testing.assert_close(recorder.theta[1], recorder.theta[0], rtol=0, atol=1e-6)
    assert (recorder.theta[2] - recorder.theta[1]).abs().max() > 1e-4
    assert (theta_end - recorder.theta[3]).abs().max() > 1e-4


def test_bad_setups_are_refused_in_one_line(tiny, tmp_path):
    loaded, train, dev, collate = tiny
    model = fresh_model()
    args = training_args(tmp_path, max_steps=1)
    kw = dict(model=model, args=args, train_dataset=train, data_collator=collate)
    for zo_optimizer, words in (("fo-adam", "backprop"), ("mezo-svrg", "anchor batch"), ("nope", "nope")):
        with pytest.raises(L2ZOError, match=words):
            ZOTrainer(**kw, zo_optimizer=zo_optimizer)
    with pytest.raises(L2ZOError, match="once"):
        ZOTrainer(**kw, zo_optimizer="mezo", optimizers=(MeZO(model), None))
    with pytest.raises(L2ZOError, match="another model"):
        ZOTrainer(**kw, zo_optimizer=MeZO(fresh_model())).train()
    with pytest.raises(L2ZOError, match="no hyperparameter 'momentum'"):
        ZOTrainer(**kw, zo_optimizer="mezo:momentum=0.9")  # at construction, before any training
    with pytest.raises(L2ZOError, match="eps"):
        ZOTrainer(**kw, zo_optimizer="mezo", zo_args={"eps": "large"})
    with pytest.raises(L2ZOError, match="fp16"):
        fp16 = training_args(tmp_path, max_steps=1)
        fp16.fp16 = True  # set after construction: TrainingArguments itself refuses fp16 on a CPU
        ZOTrainer(**{**kw, "args": fp16})
    adapter = ZOStepAdapter(MeZO(model))
    with pytest.raises(L2ZOError, match="closure"):
        adapter.step()  # a loop's closure-less step with no ZO step before it is an error, not a no-op
    assert parse_zo_optimizer("learned=a/b:lr=1e-4:eps=0.01") == (
        "learned",
        {"artifact": "a/b", "lr": 1e-4, "eps": 0.01},
    )


def test_the_readme_example_switches_a_trainer_script_to_mezo(tmp_path):
    result = EXAMPLE.main(["--steps", "20", "--output-dir", str(tmp_path), "--train", "128", "--dev", "32"])
    assert result["after"] < result["before"] - 0.1, result


def test_a_run_resumed_from_a_trainer_checkpoint_ends_bit_for_bit_where_the_whole_run_does(tiny, tmp_path):
    """The Trainer's optimizer.pt is the l2zo optimizer's state (step count, seed, the learned net's features)."""
    loaded, train, dev, collate = tiny
    zo = f"learned={ARTIFACT}"
    whole, resumed = fresh_model(), fresh_model()
    args = dict(max_steps=4, save_strategy="steps", save_steps=2)
    ZOTrainer(model=whole, args=training_args(tmp_path / "a", **args), train_dataset=train, data_collator=collate,
              zo_optimizer=zo).train()  # fmt: skip
    trainer = ZOTrainer(model=resumed, args=training_args(tmp_path / "b", **args), train_dataset=train,
                        data_collator=collate, zo_optimizer=zo)  # fmt: skip
    counter = ForwardCounter(resumed)
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert counter.close() == 4 and trainer.zo_optimizer.step_count == 4  # steps 2 and 3 only
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_bf16_mixed_precision_probes_under_autocast(tiny, tmp_path):
    """bf16=True: accelerate's autocast is on in every probe, and the two probes differ (no stale weight cache)."""
    loaded, train, dev, collate = tiny
    model = fresh_model()
    autocast: list[bool] = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: autocast.append(torch.is_autocast_enabled("cpu")))
    trainer = ZOTrainer(model=model, args=training_args(tmp_path, max_steps=2, bf16=True), train_dataset=train,
                        data_collator=collate)  # fmt: skip
    trainer.train()
    handle.remove()
    probe = trainer.zo_optimizer.last_probe
    assert autocast == [True] * 4 and trainer.zo_optimizer.step_count == 2
    assert probe is not None and probe.loss_plus != probe.loss_minus
    assert all(p.dtype == torch.float32 and p.grad is None for p in model.parameters())  # fp32 master weights


# fixed-sigma needs a sigma file from `l2zo probe-blocks` and mezo-svrg an anchor batch (refused above); fo-* are backprop.
EVERY_ZO = [
    n for n, s in optimizer_specs().items() if s.zeroth_order and not s.needs_anchor_batch and n != "fixed-sigma"
]


@pytest.mark.slow
@pytest.mark.parametrize("name", EVERY_ZO)
def test_every_zo_optimizer_runs_through_zotrainer_at_its_forward_count(name, tiny, tmp_path):
    loaded, train, dev, collate = tiny
    model = fresh_model()
    if name == "forward-grad":
        model.set_attn_implementation("eager")  # its JVP needs forward-mode AD, which CPU SDPA lacks
    zo = f"learned={ARTIFACT}" if name == "learned" else name
    trainer = ZOTrainer(model=model, args=training_args(tmp_path, max_steps=2, learning_rate=1e-5), train_dataset=train,
                        data_collator=collate, zo_optimizer=zo)  # fmt: skip
    counter = ForwardCounter(model)
    trainer.train()
    assert counter.close() == 2 * optimizer_specs()[name].forwards_per_step
    assert trainer.zo_optimizer.step_count == 2
    assert all(p.grad is None for p in model.parameters())
