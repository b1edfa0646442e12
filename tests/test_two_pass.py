"""The two-pass step (ZOOptimizer.set_two_pass): the restore and update of step t fused with the +eps perturbation
of step t+1, against the three-pass step at the same seed."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from l2zo.cli.main import main
from l2zo.engine import NoiseTable, ZSource
from l2zo.optim.methods.learned import PerBlockConstZO
from l2zo.optim.methods.mezo import MeZO
from l2zo.optim.registry import build_optimizer
from l2zo.train.module import FinetuneModule
from tests.helpers import lm_loss, tiny_llama

SMALL = ["--num-train", "32", "--num-dev", "16", "--num-test", "16", "--batch-size", "4", "--no-progress"]


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


def _source(kind: str) -> ZSource:
    return ZSource(workers=1, table=NoiseTable(1 << 16) if kind == "table" else None)


def _steps(opt, model, ids, n: int, two_pass: bool, source: str, restore_at: tuple[int, ...] = ()) -> list:
    opt.set_z_source(zsrc=_source(source))
    assert opt.set_two_pass(two_pass) == two_pass
    for t in range(n):
        opt.step(lambda: lm_loss(model, ids))
        if t in restore_at:  # what an evaluation or a checkpoint does between steps
            opt.restore_()
            opt.restore_()  # idempotent
    opt.restore_()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("source", ["randn", "table"])
@pytest.mark.parametrize("make", [
    lambda m: MeZO(m, lr=1e-2, eps=1e-3, seed=3, weight_decay=0.1),
    lambda m: PerBlockConstZO(m, {"attn_q": 3.0, "norm": 0.2}, lr=1e-2, eps=1e-3, seed=3),
], ids=["mezo", "per-block-const"])  # fmt: skip
def test_two_pass_gives_the_three_pass_parameters_to_rounding(source: str, make) -> None:
    """20 steps, with restores in between (evaluations, checkpoints): the same losses and the same parameters, to
    the rounding of the fused passes (the fp32 ulp bound of the README, a few ulps after 20 steps)."""
    ids = _ids()
    three_model, two_model = tiny_llama(), tiny_llama()
    three, two = make(three_model), make(two_model)
    a = _steps(three, three_model, ids, 20, False, source)
    b = _steps(two, two_model, ids, 20, True, source, restore_at=(4, 5, 11))
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=2e-6)
    assert two.last_probe.projected_grad == pytest.approx(three.last_probe.projected_grad, rel=1e-4, abs=1e-5)
    moved = max(float((x - p.detach()).abs().max()) for x, p in zip(a, tiny_llama().parameters()))
    assert moved > 1e-3  # the runs did move: the agreement is not that of two idle models


def test_between_steps_theta_carries_the_next_perturbation_and_restore_takes_it_off() -> None:
    model, ref = tiny_llama(), tiny_llama()
    opt = MeZO(model, lr=1e-2, eps=1e-3, seed=1)
    opt.set_two_pass(True)
    ids = _ids()
    opt.step(lambda: lm_loss(model, ids))
    nxt = opt.step_seed(1)
    opt.restore_()
    restored = [p.detach().clone() for p in model.parameters()]
    opt.step(lambda: lm_loss(model, ids))  # the next step perturbs afresh
    # One step of the three-pass path from the same start gives the same restored theta.
    plain = MeZO(ref, lr=1e-2, eps=1e-3, seed=1)
    plain.step(lambda: lm_loss(ref, ids))
    for x, y in zip(restored, ref.parameters(), strict=True):
        torch.testing.assert_close(x, y.detach(), rtol=0, atol=1e-6)
    assert opt._ahead is not None and opt._ahead[0] == opt.step_seed(2) != nxt


def test_a_non_finite_loss_restores_theta_from_the_look_ahead() -> None:
    model = tiny_llama()
    opt = MeZO(model, lr=1e-2, eps=1e-3, seed=1)
    opt.set_two_pass(True)
    ids = _ids()
    opt.step(lambda: lm_loss(model, ids))
    opt.restore_()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(lambda: lm_loss(model, ids))
    with pytest.raises(Exception, match="non-finite"):
        opt.step(lambda: torch.tensor(float("nan")))
    opt.restore_()
    assert opt._ahead is None
    # theta is the one after step 2 (the failed step changed nothing): step 2 again from `before` agrees.
    ref = tiny_llama()
    with torch.no_grad():
        for p, q in zip(ref.parameters(), before):
            p.copy_(q)
    again = MeZO(ref, lr=1e-2, eps=1e-3, seed=1)
    again.step_count = 1
    again.step(lambda: lm_loss(ref, ids))
    for x, y in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["learned-random", "hizoo", "lozo", "zo-adam"])
def test_methods_whose_step_is_not_mezos_refuse_two_passes(name: str) -> None:
    opt = build_optimizer(name, tiny_llama(), lr=1e-3)
    assert not opt.set_two_pass(True) and not opt.two_pass


def test_a_two_pass_run_evaluates_checkpoints_and_resumes_as_the_three_pass_run(tmp_path, monkeypatch, capsys) -> None:
    """Through Lightning: evaluations every 2 steps, a checkpoint every 3, and a SIGTERM inside step 4 (a
    checkpoint at its end, exit 143) then a resume: the dev losses and the saved model equal the uninterrupted
    three-pass run's (to rounding)."""

    def run(logdir, *extra: str) -> int:
        argv = ["finetune", "--model", "tiny", "--task", "synth-sentiment", "--lr", "1e-3", "--steps", "6",
                "--eval-every", "2", "--checkpoint-every", "3", "--logdir", str(logdir), "--save-model", *extra,
                *SMALL]  # fmt: skip
        return main(argv)

    assert run(tmp_path / "three") == 0
    assert run(tmp_path / "two", "--two-pass") == 0
    with monkeypatch.context() as patch:
        original = FinetuneModule.training_step

        def signalled(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            if self.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return original(self, *args, **kwargs)

        patch.setattr(FinetuneModule, "training_step", signalled)
        assert run(tmp_path / "resumed", "--two-pass") == 143
    assert run(tmp_path / "resumed", "--two-pass", "--resume") == 0
    capsys.readouterr()
    runs = {d: json.loads((tmp_path / d / "summary.json").read_text()) for d in ("three", "two", "resumed")}
    weights = {d: load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in runs}
    for d in ("two", "resumed"):
        assert runs[d]["status"] == "ok"
        assert runs[d]["dev_loss_final"] == pytest.approx(runs["three"]["dev_loss_final"], abs=1e-6)
        for k, w in weights["three"].items():
            torch.testing.assert_close(weights[d][k], w, rtol=0, atol=1e-6)
    start = load_file("checkpoints/tiny/model.safetensors")
    assert max(float((w - start[k]).abs().max()) for k, w in weights["three"].items()) > 0


def test_resuming_with_another_z_source_is_refused(tmp_path, monkeypatch, capsys) -> None:
    """What a seed means is part of the run: a resume may switch --two-pass or --cache-z, never --z-source."""
    logdir = tmp_path / "run"
    argv = ["finetune", "--model", "tiny", "--task", "synth-sentiment", "--lr", "1e-3", "--steps", "4",
            "--eval-every", "2", "--checkpoint-every", "1", "--logdir", str(logdir), "--z-source", "table", *SMALL]  # fmt: skip
    with monkeypatch.context() as patch:
        original = FinetuneModule.training_step

        def signalled(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            if self.global_step == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return original(self, *args, **kwargs)

        patch.setattr(FinetuneModule, "training_step", signalled)
        assert main(argv) == 143
    capsys.readouterr()
    assert main([*argv[: -len(SMALL) - 2], *SMALL, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--z-source 'table' in the run, 'randn' now" in err
    assert main([*argv, "--two-pass", "--resume"]) == 0
    assert json.loads((logdir / "summary.json").read_text())["status"] == "ok"
