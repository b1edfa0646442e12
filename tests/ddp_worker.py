"""Test helper, not a test: run one ``l2zo`` command in this process, as every rank of a data-parallel run does,
saving each rank's final weights to ``OUT/rank<R>.pt``.

    python tests/ddp_worker.py OUT [DIVERGE_AT] -- finetune --devices 2 --strategy ddp ...

Lightning's launcher starts ranks 1..N-1 by re-running this very command line. ``DIVERGE_AT`` (a step) nudges
one weight of rank 1 by one ulp after that step: the fault the replica checksum must catch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch


class SaveWeights(L.Callback):
    """At the end of ``fit``: this rank's state dict (model, and a meta-train's net) to ``out/rank<R>.pt``."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, self.out / f"rank{trainer.global_rank}.pt")


class DivergeRank1(L.Callback):
    """After optimizer step ``step``, rank 1's first parameter entry moves to the next float up."""

    def __init__(self, step: int) -> None:
        self.step = step

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        if trainer.global_rank == 1 and trainer.global_step == self.step:
            p = next(pl_module.parameters()).view(-1)
            p[0] = torch.nextafter(p[0], torch.tensor(float("inf"), dtype=p.dtype))


def install(extra: list[L.Callback]) -> None:
    """Add ``extra`` to the callbacks of every trainer that finetune and meta-train build."""
    import l2zo.train.finetune as finetune
    import l2zo.train.meta_train as meta_train

    make, make_meta = finetune.make_trainer, meta_train.make_meta_trainer
    finetune.make_trainer = lambda cfg, logger, callbacks=None: make(cfg, logger, [*(callbacks or []), *extra])
    meta_train.make_meta_trainer = lambda cfg, logdir, logger=True, callbacks=None: make_meta(
        cfg, logdir, logger, [*(callbacks or []), *extra]
    )


if __name__ == "__main__":
    split = sys.argv.index("--")
    out, *diverge = sys.argv[1:split]
    install([SaveWeights(Path(out)), *(DivergeRank1(int(d)) for d in diverge)])
    from l2zo.cli.main import main

    sys.exit(main(sys.argv[split + 1 :]))
