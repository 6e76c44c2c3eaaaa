"""What one attempt trains with (not the queue's JobQueue, JobRun or JobView). `Rank`: what
every rank of a job holds alike, built by `setup_rank`, the one setup of every rank (the rank a
parameter). `TrainingJob`: rank 0's, a Rank plus what rank 0 alone owns (train.setup adds it):
the claim, storage and checkpoints, reporting, the stop request."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from cherry_train.jobqueue.claims import Claim
from cherry_train.schemas import ModelConfig, TrainingConfig
from cherry_train.worker.checkpoints.state import TrainState
from cherry_train.worker.checkpoints.store import Checkpoints
from cherry_train.worker.inputs.data import Data, load_data
from cherry_train.worker.multigpu.distributed import Group
from cherry_train.worker.reporting.reporter import Reporter
from cherry_train.worker.signals import StopRequest
from cherry_train.worker.training.device import Precision, resolve_precision, seed_and_determinism
from cherry_train.worker.training.model import build_model
from cherry_train.worker.training.optim import make_optimizer, make_scheduler

R = TypeVar("R", bound="Rank")


@dataclass(kw_only=True)
class Rank:
    """What steps.train_step and validation.validate read of a job, on every rank."""

    cfg: TrainingConfig
    device: torch.device
    precision: Precision
    data: Data
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    rank: int = 0
    compilation: Any = None  # compiling.Compilation on rank 0, followers.Eager elsewhere
    group: Group | None = None  # the other ranks, when the job trains on several GPUs
    state: TrainState = field(default_factory=TrainState)

    @property
    def ranks(self) -> int:
        return self.group.ranks if self.group is not None else 1


@dataclass(kw_only=True)
class TrainingJob(Rank):
    """Rank 0's job: where each part comes from is in train.setup."""

    claim: Claim
    checkpoints: Checkpoints
    reporter: Reporter
    stop: StopRequest
    scratch: Path
    clock: Callable[[], float] = time.perf_counter  # intervals: checkpoints, throughput, wall
    data_info: dict[str, Any] = field(default_factory=dict)
    last_checkpoint_at: float = 0.0
    attempt_started_at: float = 0.0
    wall_before: float = 0.0  # wall_seconds of earlier attempts
    # The best epoch's weights when storing them as best.pt failed: the next checkpoint (or the
    # end of the job) stores them, so best.pt always holds the epoch the result names.
    pending_best: dict[str, torch.Tensor] | None = None
    first_step_done: bool = False
    first_batch_at: float | None = None  # when the first step's batch came (progress.py says)
    mid_step: bool = False  # True while a step changes the model: its state is then torn

    def __post_init__(self) -> None:
        self.last_checkpoint_at = self.attempt_started_at = self.clock()

    @property
    def total_steps(self) -> int:
        return self.cfg.training.epochs * self.data.steps_per_epoch

    @property
    def steps_left(self) -> int:
        return self.total_steps - self.state.global_step

    def begin_step(self) -> None:
        """A step starts changing the model (mid_step); the first one's batch has come."""
        self.mid_step = True
        if self.first_batch_at is None:
            self.first_batch_at = self.clock()

    def update_wall(self) -> None:
        self.state.wall_seconds = self.wall_before + self.clock() - self.attempt_started_at


def setup_rank(kind: type[R], cfg: TrainingConfig, device: torch.device, train_dir: Path,
               val_dir: Path, max_workers: int | None, rank: int, ranks: int,
               build: Callable[[ModelConfig, Path | None], nn.Module] = build_model,
               weights_file: Path | None = None, **own: Any) -> R:
    """The model, optimizer, scheduler, scaler and criterion of rank `rank` of `ranks`, over
    its share of the data: built the same on every rank, so the ranks step one model together.
    `kind` is Rank on a follower; on rank 0 it is TrainingJob, and `own` what rank 0 alone owns."""
    seed_and_determinism(cfg.seed, cfg.deterministic, device)
    data = load_data(cfg, train_dir, val_dir, device, max_workers, rank=rank, ranks=ranks)
    # Rank 0's weights reach every other rank (DistributedDataParallel broadcasts them, then
    # the shared state): no pretrained download there.
    model = build(cfg.model if rank == 0 else cfg.model.model_copy(update={"pretrained": False}),
                  weights_file if rank == 0 else None).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model, device)
    precision = resolve_precision(cfg.amp, device)
    total = cfg.training.epochs * data.steps_per_epoch
    return kind(cfg=cfg, device=device, precision=precision, data=data, model=model,
                optimizer=optimizer, scheduler=make_scheduler(cfg, optimizer, total),
                scaler=torch.amp.GradScaler(device.type, enabled=precision.needs_scaler),
                criterion=nn.CrossEntropyLoss(label_smoothing=cfg.training.label_smoothing),
                rank=rank, **own)
