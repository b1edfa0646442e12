"""``l2zo finetune --resume``: what is checked before a stopped fine-tune continues, and where it continues from.

A run is resumed from ``LOGDIR/checkpoints/last.ckpt`` (``l2zo.train.checkpoints``) with the run's own config:
a finished run, a missing or unreadable checkpoint, a config that differs in anything but ``RESUME_MAY_CHANGE``
(the differing keys named) and a checkpoint beyond ``--steps`` are refused, one line each.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path
from typing import Any

from l2zo.config import DistributedArgs, FinetuneConfig, ZArgs, config_to_dict
from l2zo.config.checks import flag
from l2zo.errors import L2ZOError
from l2zo.train.checkpoints import last_checkpoint, read_checkpoint
from l2zo.utils.runstatus import OK

RUN_KEY = "l2zo_finetune_run"  # the run's part of a checkpoint: its config and wall time so far
# Config keys a resumed run may change: the step budget, and knobs that change neither the batches, the
# updates nor the evaluations (how often checkpoints are written, the progress bar, saving the final model).
# The devices too: a data-parallel run resumes on one process (the same run up to float summation order); and how
# z is applied (a cached z, two passes), never what z is (--z-source, --z-table-size: what a seed means).
RESUME_MAY_CHANGE = ("steps", "checkpoint_every", "progress", "save_model", "dist.devices", "dist.num_nodes",
                     "dist.strategy", "dist.checksum_every", "zo.cache_z", "zo.two_pass")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run starts: its checkpoint, the step and the wall time it holds."""

    checkpoint: Path
    step: int
    wall_time_s: float


def _flat(config: dict[str, Any], cfg: FinetuneConfig) -> dict[str, Any]:
    """``config_to_dict`` output with the nested configs' keys dotted (``data.batch_size``)."""
    groups = {f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))}
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key in groups and isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def resume_command(cfg: FinetuneConfig) -> str:
    """The command that continues the run in ``cfg.logdir`` (its config.yaml is the run's resolved config)."""
    return shlex.join(["l2zo", "finetune", "--config", str(Path(cfg.logdir) / "config.yaml"), "--resume"])


def check_resume(cfg: FinetuneConfig, logdir: Path) -> ResumePoint:
    """The checkpoint to resume the run in ``logdir`` from; ``L2ZOError`` for a finished run, a missing or
    unreadable checkpoint, a config that differs in anything but ``RESUME_MAY_CHANGE`` (naming the keys), or a
    checkpoint beyond ``--steps``."""
    status = _recorded_status(logdir)
    if status == OK:
        raise L2ZOError(f"--resume: the run in {logdir} has finished (summary.json: status ok); there is nothing to "
                        "resume. Train more in a new run: another --logdir, or --overwrite")  # fmt: skip
    path = last_checkpoint(logdir)
    if not path.is_file():
        raise L2ZOError(f"--resume: no checkpoint {path} (the run in {logdir} stopped before its first one); start it "
                        "again with --overwrite, and a smaller --checkpoint-every to save more often")  # fmt: skip
    ckpt = read_checkpoint(path)
    run = ckpt.get(RUN_KEY)
    if not isinstance(run, dict) or not isinstance(run.get("config"), dict):
        raise L2ZOError(f"--resume: {path} was not written by `l2zo finetune`; start the run again with --overwrite")
    # A run saved before --devices existed ran on one process: its dist group is the default; one saved before
    # --z-source drew z by randn, with cache_z at the top.
    old = dict(run["config"])
    zo = {**dataclasses.asdict(ZArgs()), **({"cache_z": old.pop("cache_z")} if "cache_z" in old else {})}
    saved = _flat({"dist": dataclasses.asdict(DistributedArgs()), "zo": zo, **old}, cfg)
    now = _flat(config_to_dict(cfg), cfg)
    keys = [*now, *(k for k in saved if k not in now)]
    # logdir: the checkpoint is in it (a run folder may have been moved).
    diff = [k for k in keys if k not in (*RESUME_MAY_CHANGE, "logdir") and saved.get(k) != now.get(k)]
    if diff:
        shown = "; ".join(f"{flag(k)} {saved.get(k)!r} in the run, {now.get(k)!r} now" for k in diff)
        may = ", ".join(flag(k) for k in RESUME_MAY_CHANGE)
        raise L2ZOError(f"--resume: the config differs from the run's ({shown}). A resumed run keeps its config "
                        f"(only {may} may change); resume with: {resume_command(cfg)}")  # fmt: skip
    step = int(ckpt.get("global_step", 0))
    if step > cfg.steps:
        raise L2ZOError(f"--resume: the checkpoint {path} is at step {step}, beyond --steps {cfg.steps}; raise --steps")
    return ResumePoint(path, step, float(run.get("wall_time_s", 0.0)))


def _recorded_status(logdir: Path) -> str | None:
    try:
        return json.loads((logdir / "summary.json").read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError, AttributeError):  # no summary, or not one l2zo wrote
        return None
