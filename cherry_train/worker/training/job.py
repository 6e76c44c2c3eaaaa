"""One attempt's training job (`TrainingJob`; not the queue's JobQueue, JobRun or JobView):
everything the training functions share, built once by train.setup. Where each part comes from
is in train.py; here only what it holds."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cherry_train.jobqueue.claims import Claim
from cherry_train.schemas import TrainingConfig
from cherry_train.worker.checkpoints.state import TrainState
from cherry_train.worker.checkpoints.store import Checkpoints
from cherry_train.worker.inputs.data import Data
from cherry_train.worker.multigpu.distributed import Group
from cherry_train.worker.reporting.reporter import Reporter
from cherry_train.worker.signals import StopRequest
from cherry_train.worker.training.compiling import Compilation
from cherry_train.worker.training.device import Precision


@dataclass
class TrainingJob:
    claim: Claim
    cfg: TrainingConfig
    device: torch.device
    precision: Precision
    data: Data
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    checkpoints: Checkpoints
    compilation: Compilation
    reporter: Reporter
    stop: StopRequest
    scratch: Path
    clock: Callable[[], float] = time.perf_counter  # intervals: checkpoints, throughput, wall
    state: TrainState = field(default_factory=TrainState)
    data_info: dict[str, Any] = field(default_factory=dict)
    last_checkpoint_at: float = 0.0
    attempt_started_at: float = 0.0
    wall_before: float = 0.0  # wall_seconds of earlier attempts
    # The best epoch's weights when storing them as best.pt failed: the next checkpoint (or the
    # end of the job) stores them, so best.pt always holds the epoch the result names.
    pending_best: dict[str, torch.Tensor] | None = None
    group: Group | None = None  # the other ranks, when the job trains on several GPUs
    first_step_done: bool = False
    mid_step: bool = False  # True while a step changes the model: its state is then torn

    def __post_init__(self) -> None:
        self.last_checkpoint_at = self.attempt_started_at = self.clock()

    @property
    def total_steps(self) -> int:
        return self.cfg.training.epochs * self.data.steps_per_epoch

    @property
    def steps_left(self) -> int:
        return self.total_steps - self.state.global_step

    @property
    def ranks(self) -> int:
        return self.group.ranks if self.group is not None else 1

    def agreed(self, flag: bool) -> bool:
        """Rank 0's word (stop, or end here) told to the other ranks at a point where each of
        them asks too (followers.py); on one GPU just the word."""
        return self.group.agree(flag) if self.group is not None else flag

    def update_wall(self) -> None:
        self.state.wall_seconds = self.wall_before + self.clock() - self.attempt_started_at
