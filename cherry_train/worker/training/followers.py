"""The other ranks of a multi-GPU job (rank 0 is the worker itself: train.py). A follower writes
nothing: it trains its share of every batch, validates its share of the val images, and asks
rank 0 at the same points as train.py does whether to stop, so every rank ends after the same
step. It starts from the state rank 0 shares after its resume, so a resumed job continues on
every rank from the same checkpoint.

A follower ignores SIGINT and SIGTERM (the runtime signals the whole process group: rank 0 gets
the same signal and decides), and exits if rank 0's process is gone.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cherry_train import faults
from cherry_train.schemas import Manifest
from cherry_train.worker.checkpoints.state import TrainState
from cherry_train.worker.inputs.data import Data, load_data
from cherry_train.worker.inputs.modelinput import with_image_size
from cherry_train.worker.multigpu.distributed import Group, RankSpec
from cherry_train.worker.training.device import Precision, resolve_precision, seed_and_determinism
from cherry_train.worker.training.model import build_model
from cherry_train.worker.training.optim import make_optimizer, make_scheduler
from cherry_train.worker.training.steps import train_step
from cherry_train.worker.training.validation import validate

log = structlog.get_logger(__name__)

TIMEOUT_FLOOR_SECONDS = 120.0


class Eager:
    """A follower's stand-in for compiling.Compilation: multi-GPU jobs train eagerly."""

    def __init__(self, model: nn.Module):
        self.model = model

    def step(self, run):
        return run()

    def model_for_step(self) -> nn.Module:
        return self.model


@dataclass
class Rank:
    """What steps.train_step and validation.validate read of a job, on a follower."""

    cfg: Any
    device: torch.device
    precision: Precision
    data: Data
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    compilation: Eager
    group: Group
    state: TrainState = field(default_factory=TrainState)
    seed: int = 0  # this rank's randomness, reseeded at every step


# -- rank 0's side ---------------------------------------------------------------------------------

def start(manifest: Manifest, model: nn.Module, device: torch.device, ranks: int,
          train_dir: Path, val_dir: Path, max_workers: int | None) -> tuple[Group | None,
                                                                       nn.Module]:
    """Rank 0 (the worker): start ranks 1..ranks-1, form the group with them, and wrap the
    model so that its gradients are all-reduced. (None, the model) on one GPU. Collectives time
    out after the job's lease (at least TIMEOUT_FLOOR_SECONDS: the ranks' start, their data
    and model, come before the first one), so a hung rank ends the attempt."""
    if ranks == 1:
        return None, model
    timeout = max(manifest.config.lease_seconds, TIMEOUT_FLOOR_SECONDS)
    group = Group(0, ranks, device, timeout)
    group.start(follow, lambda rank, port: RankSpec(
        rank=rank, ranks=ranks, port=port, device_type=device.type,
        manifest_json=manifest.to_json(), train_dir=str(train_dir), val_dir=str(val_dir),
        max_workers=max_workers, timeout_seconds=timeout, parent_pid=os.getpid(),
        threads=torch.get_num_threads()))
    try:
        return group, group.collective(lambda: _wrap(model, device))
    except BaseException:
        group.close(finished=False)
        raise


def _wrap(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    if device.type != "cuda":
        return DistributedDataParallel(model)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return DistributedDataParallel(model, device_ids=[index])


def share(job) -> None:
    """Rank 0, after its resume: every rank continues from rank 0's state."""
    if job.group is None:
        return
    job.group.share_state({
        "model": job.model.state_dict(), "optimizer": job.optimizer.state_dict(),
        "scheduler": job.scheduler.state_dict(), "scaler": job.scaler.state_dict(),
        "state": asdict(job.state)})


# -- a follower ------------------------------------------------------------------------------------

def follow(spec: RankSpec) -> None:
    """A spawned rank's whole life."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Rank 0 says what the job does; the others speak only of trouble.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    threading.Thread(target=_exit_with_parent, args=(spec.parent_pid,), daemon=True).start()
    torch.set_num_threads(spec.threads)
    device = torch.device("cuda", spec.rank) if spec.device_type == "cuda" else \
        torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = Group(spec.rank, spec.ranks, device, spec.timeout_seconds)
    group.join_as_follower(spec.port)
    rank = None
    try:
        faults.point("follower-setup")
        rank = _setup(spec, device, group)
        _train(rank)
    except BaseException as e:
        group.report(e)  # rank 0 puts it in the job's history (or fails the job: a JobError)
        raise
    finally:
        if rank is not None:
            rank.data.close()
        group.close(finished=True)


def _setup(spec: RankSpec, device: torch.device, group: Group) -> Rank:
    """The same model, optimizer and data as rank 0 builds (train.setup), this rank's share."""
    cfg = with_image_size(Manifest.from_json(spec.manifest_json).config)
    seed_and_determinism(cfg.seed, cfg.deterministic, device)
    data = load_data(cfg, Path(spec.train_dir), Path(spec.val_dir), device, spec.max_workers,
                     rank=spec.rank, ranks=spec.ranks)
    # Rank 0's weights reach every rank (DistributedDataParallel broadcasts them, then the
    # shared state): no pretrained download here.
    model = build_model(cfg.model.model_copy(update={"pretrained": False}), None).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ddp = _wrap(model, device)
    optimizer = make_optimizer(cfg, model, device)
    precision = resolve_precision(cfg.amp, device)
    total = cfg.training.epochs * data.steps_per_epoch
    rank = Rank(cfg=cfg, device=device, precision=precision, data=data, model=model,
                optimizer=optimizer, scheduler=make_scheduler(cfg, optimizer, total),
                scaler=torch.amp.GradScaler(device.type, enabled=precision.needs_scaler),
                criterion=nn.CrossEntropyLoss(label_smoothing=cfg.training.label_smoothing),
                compilation=Eager(ddp), group=group)
    shared = group.share_state(None)
    model.load_state_dict(shared["model"])
    optimizer.load_state_dict(shared["optimizer"])
    rank.scheduler.load_state_dict(shared["scheduler"])
    rank.scaler.load_state_dict(shared["scaler"])
    rank.state = TrainState(**shared["state"])
    rank.seed = cfg.seed * 1_000_003 + spec.rank * 7919
    return rank


def _train(rank: Rank) -> None:
    """train.train's loop, step for step and question for question."""
    state, group, epochs = rank.state, rank.group, rank.cfg.training.epochs
    if group.agree(False):  # rank 0: a trial paused at a rung ends here (pruning.after_resume)
        return
    while state.epoch < epochs:
        if group.agree(False):  # rank 0: a stop before the epoch starts
            return
        rank.model.train()
        for x, y in rank.data.train_batches(state.epoch, state.step_in_epoch):
            # This rank's randomness (dropout, drop-path) drawn afresh from the step: rank 0's
            # is in its checkpoints, a follower's is not, and a resume must draw the same.
            torch.manual_seed(rank.seed + state.global_step)
            train_step(rank, x, y)
            state.step_in_epoch += 1
            state.global_step += 1
            if group.agree(False):  # rank 0: a stop after this step
                return
        validate(rank)
        if group.agree(False):  # rank 0: a sweep trial pruned or paused here
            return
        state.epoch += 1
        state.step_in_epoch = 0


def _exit_with_parent(parent_pid: int) -> None:
    """Rank 0 killed (SIGKILL, a closed notebook): nothing will answer; leave at once."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)
