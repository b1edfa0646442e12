"""``FinetuneConfig``: every knob of ``l2zo finetune`` (and of each run of ``l2zo compare``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from l2zo.config.checks import Schedule, check_fields
from l2zo.config.data import DataArgs
from l2zo.config.distributed import DistributedArgs
from l2zo.config.peft import PeftArgs
from l2zo.config.values import parse_kv, split_list
from l2zo.config.zsource import ZArgs
from l2zo.errors import L2ZOError


@dataclasses.dataclass
class FinetuneConfig:
    """Fine-tuning run"""

    data: DataArgs = dataclasses.field(default_factory=DataArgs)
    """the model and the data"""
    dist: DistributedArgs = dataclasses.field(default_factory=DistributedArgs)
    """devices, nodes and the strategy"""
    zo: ZArgs = dataclasses.field(default_factory=ZArgs)
    """how z is drawn and how many passes a step makes"""
    adapter: PeftArgs = dataclasses.field(default_factory=PeftArgs)
    """a PEFT adapter to train instead of every weight"""
    optimizer: str = "mezo"
    """optimizer name (see `l2zo optimizers`)"""
    lr: float | None = None
    """learning rate (default: the optimizer's published default)"""
    eps: float | None = None
    """ZO perturbation radius (default: the optimizer's)"""
    weight_decay: float | None = None
    """weight decay on matrices (not biases or norm gains)"""
    opt_args: dict[str, Any] | str = dataclasses.field(default_factory=dict)
    """other optimizer hyperparameters: key=value[,key=value] or a YAML mapping"""
    artifact: str | None = None
    """learned-optimizer artifact folder (for --optimizer learned)"""
    steps: int = 200
    """optimizer steps"""
    eval_every: int = 100
    """evaluate on dev every N steps"""
    seed: int = 0
    """training seed: z seeds and batch order"""
    lr_schedule: Schedule = "constant"
    """constant, or linear (decay to 0)"""
    logdir: str = "runs/finetune"
    """run folder: TensorBoard events, config.yaml, summary.json"""
    save_model: bool = False
    """save the fine-tuned model into LOGDIR/model (with --peft: the adapter, in peft's save_pretrained format)"""
    checkpoint_every: int = 500
    """save a resumable checkpoint (LOGDIR/checkpoints/last.ckpt; only the last is kept, removed when the run
    finishes) every N steps, and when SIGTERM/SIGINT stops the run; 0: only then. A full model's checkpoint is
    the size of its weights plus the optimizer state"""
    include: list[str] | str | None = None
    """regexes (comma-separated or a YAML list): train only parameters whose names match"""
    exclude: list[str] | str | None = None
    """regexes (comma-separated or a YAML list): freeze parameters whose names match"""
    progress: bool = True
    """show a progress bar"""

    def __post_init__(self) -> None:
        if isinstance(self.opt_args, str):
            self.opt_args = parse_kv(self.opt_args, "--opt-args")
        self.include = None if self.include is None else split_list(self.include)
        self.exclude = None if self.exclude is None else split_list(self.exclude)
        check_fields(self, positive=("steps", "eval_every"))
        if self.checkpoint_every < 0:
            raise L2ZOError(
                f"--checkpoint-every must be 0 (only on SIGTERM/SIGINT) or positive, got {self.checkpoint_every}"
            )
