"""The other ranks of a multi-GPU job (rank 0 is the worker itself: train.py). A follower is set
up as rank 0 is (job.setup_rank) and runs the same loop (lockstep.train_epochs), so it asks
rank 0 at the same points whether to stop and every rank ends after the same step. It writes
nothing: it trains its share of every batch and validates its share of the val images. It
starts from the state rank 0 shares after its resume, so a resumed job continues on every rank
from the same checkpoint.

A follower ignores SIGINT and SIGTERM (the runtime signals the whole process group: rank 0 gets
the same signal and decides), and exits if rank 0's process is gone.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import structlog
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cherry_train import faults
from cherry_train.schemas import Manifest
from cherry_train.worker.checkpoints.state import TrainState
from cherry_train.worker.inputs.modelinput import with_image_size
from cherry_train.worker.multigpu.distributed import Group, RankSpec
from cherry_train.worker.training.job import Rank, setup_rank
from cherry_train.worker.training.lockstep import Agreement, train_epochs
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


# -- rank 0's side ---------------------------------------------------------------------------------

def start(manifest: Manifest, model: nn.Module, device: torch.device, ranks: int,
          train_dir: Path, val_dir: Path, max_workers: int | None,
          heard: Callable[[str, bool], None] | None = None) -> tuple[Group | None, nn.Module]:
    """Rank 0 (the worker): start ranks 1..ranks-1, form the group with them, and wrap the
    model so that its gradients are all-reduced. (None, the model) on one GPU. Collectives time
    out after the job's lease (at least TIMEOUT_FLOOR_SECONDS: the ranks' start, their data
    and model, come before the first one), so a hung rank ends the attempt. `heard`: a test's
    record of the ranks' words (lockstep.Agreement), on every rank."""
    if ranks == 1:
        return None, model
    timeout = max(manifest.config.lease_seconds, TIMEOUT_FLOOR_SECONDS)
    group = Group(0, ranks, device, timeout)
    group.start(follow, lambda rank, port: RankSpec(
        rank=rank, ranks=ranks, port=port, device_type=device.type,
        manifest_json=manifest.to_json(), train_dir=str(train_dir), val_dir=str(val_dir),
        max_workers=max_workers, timeout_seconds=timeout, parent_pid=os.getpid(),
        threads=torch.get_num_threads(), heard=heard))
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
        train_epochs(Follower(rank), Agreement(group, spec.heard))
    except BaseException as e:
        group.report(e)  # rank 0 puts it in the job's history (or fails the job: a JobError)
        raise
    finally:
        if rank is not None:
            rank.data.close()
        group.close(finished=True)


def _setup(spec: RankSpec, device: torch.device, group: Group) -> Rank:
    """The same model, optimizer and data as rank 0 builds (job.setup_rank, as train.setup
    does), this rank's share; then rank 0's state, as it stands after its resume."""
    cfg = with_image_size(Manifest.from_json(spec.manifest_json).config)
    rank = setup_rank(Rank, cfg, device, Path(spec.train_dir), Path(spec.val_dir),
                      spec.max_workers, rank=spec.rank, ranks=spec.ranks, group=group)
    rank.compilation = Eager(_wrap(rank.model, device))
    shared = group.share_state(None)
    rank.model.load_state_dict(shared["model"])
    rank.optimizer.load_state_dict(shared["optimizer"])
    rank.scheduler.load_state_dict(shared["scheduler"])
    rank.scaler.load_state_dict(shared["scaler"])
    rank.state = TrainState(**shared["state"])
    return rank


class Follower:
    """A follower at each point of lockstep.train_epochs, the loop rank 0 runs too: it trains
    and validates its share, and to every question says no (rank 0 decides)."""

    def __init__(self, rank: Rank):
        self.rank, self.state, self.epochs = rank, rank.state, rank.cfg.training.epochs
        self.seed = rank.cfg.seed * 1_000_003 + rank.rank * 7919  # this rank's randomness

    def ends_at_resume(self) -> bool:
        return False

    def stop_asked(self) -> bool:
        return False

    def batches(self):
        self.rank.model.train()
        return self.rank.data.train_batches(self.state.epoch, self.state.step_in_epoch)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        # This rank's randomness (dropout, drop-path) drawn afresh from the step: rank 0's is
        # in its checkpoints, a follower's is not, and a resume must draw the same.
        torch.manual_seed(self.seed + self.state.global_step)
        train_step(self.rank, x, y)
        self.state.step_in_epoch += 1
        self.state.global_step += 1

    def between_steps(self) -> None:
        pass  # rank 0 alone checkpoints

    def stop(self) -> None:
        pass  # rank 0 alone checkpoints

    def steps_failed(self, error: Exception) -> bool:
        return False  # raised, for rank 0 to hear of (group.report)

    def end_epoch(self) -> bool:
        validate(self.rank)
        self.state.epoch += 1
        self.state.step_in_epoch = 0
        return False


def _exit_with_parent(parent_pid: int) -> None:
    """Rank 0 killed (SIGKILL, a closed notebook): nothing will answer; leave at once."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)
