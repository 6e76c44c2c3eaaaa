"""Training one job, resumable at any checkpoint, in the shape of torchvision's
references/classification/train.py: `setup`, one epoch (`Leader`: rank 0's part in the loop
of every rank, lockstep.py), `validate` (validation.py), `train` (their `main`). Elsewhere: one
step in steps.py, the other ranks in followers.py, when to checkpoint in saving.py, compiling in
compiling.py, data in prepare.py and data.py.

What a test may replace is passed in (Seams), never patched into the module.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import torch
from torch import nn

from cherry_train import faults
from cherry_train.backoff import Backoff
from cherry_train.jobqueue.owner import Fenced
from cherry_train.schemas import ModelConfig, Phase
from cherry_train.worker.checkpoints.store import Checkpoints
from cherry_train.worker.errors import JobError, is_cuda_error, raise_named
from cherry_train.worker.inputs.loaders import loader_cap
from cherry_train.worker.inputs.modelinput import with_image_size
from cherry_train.worker.inputs.prepare import local_file, prepare_data
from cherry_train.worker.multigpu.distributed import world_size
from cherry_train.worker.outcome import JobRun, Outcome
from cherry_train.worker.training import followers
from cherry_train.worker.training.compiling import Compilation, CompileState, TorchCompiler
from cherry_train.worker.training.device import describe, pick_device
from cherry_train.worker.training.export import export_best
from cherry_train.worker.training.job import TrainingJob, setup_rank
from cherry_train.worker.training.lockstep import STOPPED, Agreement, train_epochs
from cherry_train.worker.training.model import build_model
from cherry_train.worker.training.progress import first_step, log_progress, progress
from cherry_train.worker.training.pruning import PAUSE, after_resume, at_epoch_end
from cherry_train.worker.training.saving import (
    STORE_RESULTS,
    checkpoint_due,
    checkpoint_now,
    drain,
    fold_running_sums,
    keep_state,
    report_durable,
    report_failed,
    resume,
    save_checkpoint,
    store_final,
)
from cherry_train.worker.training.steps import train_step
from cherry_train.worker.training.validation import validate

log = structlog.get_logger(__name__)

Step = Callable[[TrainingJob, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Validate = Callable[[TrainingJob], tuple[float, float]]  # (loss, accuracy)


@dataclass
class Seams:
    """The parts of training a test replaces: the clock intervals are measured with, the device,
    the model, the optimizer step, validation, the compiler, the wait for storage at the end."""

    clock: Callable[[], float] = time.perf_counter
    device: Callable[[], torch.device] = pick_device
    build_model: Callable[[ModelConfig, Path | None], nn.Module] = build_model
    step: Step = train_step
    validate: Validate | None = None  # None: validation's
    compiler: TorchCompiler = field(default_factory=TorchCompiler)
    store_results: Backoff = STORE_RESULTS
    heard: Callable[[str, bool], None] | None = None  # every rank's words (lockstep.py)


class Training:
    """The worker's Runner for training jobs (mode: training or development)."""

    def __init__(self, seams: Seams | None = None):
        self.seams = seams or Seams()

    def __call__(self, run: JobRun) -> Outcome:
        return train(run, self.seams)


def setup(run: JobRun, seams: Seams) -> TrainingJob:
    """Rank 0's setup: what every rank builds alike (job.setup_rank, as each follower does),
    from the data and weights rank 0 alone fetches from storage, plus what rank 0 alone owns:
    the claim, checkpoints, reporting, compilation, and the other ranks it starts."""
    claim, reporter = run.claim, run.reporter
    cfg, reader = with_image_size(claim.manifest.config), reporter.owner.reader
    device = seams.device()
    train_dir, val_dir, data_info = prepare_data(
        cfg, run.data_root, reader, copying=lambda: reporter.update_now(phase=Phase.copying_data))
    ranks, max_workers = world_size(run.gpus, device, cfg.training.batch_size), \
        loader_cap(claim.attempt.previous)
    weights = cfg.model.pretrained
    weights_file = (local_file(weights, "model.pretrained", run.data_root, reader, run.scratch)
                    if isinstance(weights, str) else None)
    # The fp16 GradScaler skips the optimizer step when gradients overflow (mostly the first
    # few steps). The LR schedule still follows the step count, so that is intended; torch's
    # warning about it would only alarm users.
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
    job = setup_rank(
        TrainingJob, cfg, device, train_dir, val_dir, max_workers, rank=0, ranks=ranks,
        build=seams.build_model, weights_file=weights_file, claim=claim, reporter=reporter,
        stop=run.stop, scratch=run.scratch, clock=seams.clock, data_info=data_info,
        checkpoints=Checkpoints(reporter.owner, run.scratch, cfg.checkpoint.keep_last,
                                on_durable=report_durable(reporter),
                                on_failed=report_failed(reporter)))
    # The other GPUs' ranks (followers.py), then the model they step together (DDP).
    job.group, stepped = followers.start(claim.manifest, job.model, device, ranks, train_dir,
                                         val_dir, max_workers, seams.heard)
    job.compilation = Compilation(seams.compiler, stepped, device,
                                  cfg.performance.compile if job.group is None else "off",
                                  cfg.deterministic, reporter.owner, run.kernel_seal,
                                  reporter.update)
    return job


# -- rank 0's part in the loop every rank runs (lockstep.train_epochs) ------------------------

class Leader:
    """Rank 0 at each point of lockstep.train_epochs: it answers the ranks' questions (a stop
    asked for, a sweep trial's rung) and alone reports, logs and checkpoints."""

    def __init__(self, job: TrainingJob, step: Step, validate: Validate, progress_bar: bool,
                 early: tuple[str, dict] | None):
        self.job, self.state, self.epochs = job, job.state, job.cfg.training.epochs
        self.train_step, self.validate, self.progress_bar = step, validate, progress_bar
        self.early = early  # a sweep trial's verdict at a rung (pruning.py): pause or prune
        # The epoch's running sums, on the device (read only when logged); folded into the
        # state (and zeroed) at every log line, checkpoint and epoch end.
        self.loss_sum = torch.zeros((), device=job.device, dtype=torch.float64)
        self.correct = torch.zeros((), device=job.device, dtype=torch.int64)
        self.bar, self.window, self.step_started = None, (0.0, 0), 0.0

    def ends_at_resume(self) -> bool:
        return self.early is not None

    def stop_asked(self) -> bool:
        return self.job.stop.is_set()

    def batches(self):
        """The rest of the current epoch's batches; its sums folded once they are done."""
        job, state = self.job, self.state
        job.model.train()
        batches = job.data.train_batches(state.epoch, state.step_in_epoch)
        self.window = (job.clock(), 0)  # (start, images) of the throughput window
        self.bar = progress(self.progress_bar, job, job.data.steps_per_epoch, state.step_in_epoch)
        self.step_started = job.clock()
        yield from batches
        if self.bar is not None:
            self.bar.close()
        fold_running_sums(state, self.loss_sum, self.correct)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        job, state = self.job, self.state
        job.begin_step()
        step_loss, step_correct = self.train_step(job, x, y)
        self.loss_sum += step_loss * y.shape[0]
        self.correct += step_correct
        state.step_in_epoch += 1
        state.global_step += 1
        state.epoch_seen += y.shape[0]  # this rank's share: its loss and accuracy sums
        state.images_seen += y.shape[0] * job.ranks  # every rank's: the job's throughput
        job.mid_step = False
        self.window = (self.window[0], self.window[1] + y.shape[0] * job.ranks)
        state.train_seconds += job.clock() - self.step_started
        if self.bar is not None:
            self.bar.update(1)
        if not job.first_step_done:
            first_step(job)
        faults.point("step")
        if job.compilation.state == CompileState.undecided:
            job.compilation.consider(state.micro_batch or y.shape[0], job.steps_left)
        if state.global_step % job.cfg.log_every_steps == 0 or \
                state.step_in_epoch == job.data.steps_per_epoch:
            self.window = log_progress(job, self.loss_sum, self.correct, self.window, self.bar)

    def between_steps(self) -> None:
        job, state = self.job, self.state
        if checkpoint_due(job) and state.step_in_epoch < job.data.steps_per_epoch:
            fold_running_sums(state, self.loss_sum, self.correct)
            save_checkpoint(job, "interval")
        self.step_started = job.clock()

    def stop(self) -> None:
        if self.job.stop.reason == "fenced":
            raise Fenced(f"job {self.job.claim.job_id}: a later attempt took over")
        checkpoint_now(self.job, self.loss_sum, self.correct, f"stop ({self.job.stop.reason})")

    def steps_failed(self, e: Exception) -> bool:
        """True where the failure ended the stop asked for (its signal may have caused it)."""
        job = self.job
        if isinstance(e, Fenced | JobError) or job.mid_step or is_cuda_error(e):
            return False
        # Between two steps the training state is whole (a loader process died, say): keep it,
        # so the next attempt resumes from here, not from the last interval checkpoint.
        keep_state(job, self.loss_sum, self.correct, why=f"handing back ({type(e).__name__})")
        if job.stop.is_set():
            return True
        raise_named(e)

    def end_epoch(self) -> bool:
        """Validate, record, checkpoint; True where a sweep's trial ends (behind its siblings)."""
        try:
            end_epoch(self.job, self.validate)
        except Exception as e:  # validation has loader processes too
            if self.job.stop.is_set():
                raise
            raise_named(e)
        self.early = at_epoch_end(self.job)
        return self.early is not None


def end_epoch(job: TrainingJob, validate: Validate) -> None:
    state = job.state
    job.reporter.update(phase=Phase.validating)
    val_loss, val_acc = validate(job)
    record = {
        "kind": "epoch", "epoch": state.epoch + 1, "step": state.global_step,
        "train_loss": state.epoch_loss_sum / max(1, state.epoch_seen),
        "train_accuracy": state.epoch_correct / max(1, state.epoch_seen),
        "val_loss": val_loss, "val_accuracy": val_acc, "lr": job.scheduler.get_last_lr()[0],
    }
    job.reporter.metric(record)
    state.last_epoch = {k: v for k, v in record.items() if k not in ("kind", "epoch", "step")}
    log.info("epoch done", job_id=job.claim.job_id, epoch=state.epoch + 1,
             epochs=job.cfg.training.epochs,
             **{k: round(v, 4) for k, v in state.last_epoch.items() if k != "lr"})
    best = state.best
    improved = best is None or (val_acc, -val_loss) > (best["val_accuracy"], -best["val_loss"])
    if improved:
        state.best = {"epoch": state.epoch + 1, "val_accuracy": val_acc, "val_loss": val_loss}
    job.reporter.update(best_val_accuracy=state.best["val_accuracy"])
    state.epoch += 1
    state.step_in_epoch = 0
    state.epoch_loss_sum, state.epoch_correct, state.epoch_seen = 0.0, 0, 0
    save_checkpoint(job, "epoch end", best=improved)  # best.pt from the same copy of the state
    job.reporter.write_curves(f"{job.claim.manifest.name} ({job.claim.job_id})")


# -- the whole job ----------------------------------------------------------------------------

def train(run: JobRun, seams: Seams) -> Outcome:
    job = setup(run, seams)
    try:
        return _train(job, run, seams)
    finally:
        if job.group is not None:  # the other ranks: joined if they ended with us, else killed
            job.group.close(finished=sys.exc_info()[0] is None)


def _train(job: TrainingJob, run: JobRun, seams: Seams) -> Outcome:
    cfg, reporter = job.cfg, run.reporter
    device_name = describe(job.device, job.ranks)
    reporter.update(device=device_name, epochs=cfg.training.epochs,
                    steps_per_epoch=job.data.steps_per_epoch,
                    loader_processes=job.data.num_workers)
    resume(job)
    followers.share(job)  # every rank continues from this rank's checkpoint
    leader = Leader(job, seams.step, seams.validate or validate, run.progress_bar,
                    after_resume(job))  # a paused sweep trial: promoted, pruned, or not yet
    reporter.update_now(phase=Phase.starting, epoch=job.state.epoch + 1,
                        step=job.state.global_step)
    log.info("training", job_id=job.claim.job_id, attempt=job.claim.attempt.n,
             model=cfg.model.name, device=device_name, precision=job.precision.name,
             epochs=cfg.training.epochs, steps_per_epoch=job.data.steps_per_epoch,
             batch_size=job.data.batch_size, num_workers=job.data.num_workers,
             start_epoch=job.state.epoch, start_step=job.state.global_step,
             cpu_count=os.cpu_count(), ranks=job.state.ranks)
    outcome = Outcome(completed=False, state=job.state, device=device_name,
                      precision=job.precision.name, threads=torch.get_num_threads(),
                      data=job.data_info)
    try:
        if train_epochs(leader, Agreement(job.group, seams.heard)) == STOPPED:
            return outcome
        job.checkpoints.wait()  # the last epoch's checkpoint is durable before the result
        if cfg.export.onnx and leader.early is None:  # on the validation images: loaders open
            outcome.export = {"onnx": export_best(job)}
    except BaseException:
        drain(job)
        raise
    finally:
        job.data.close()  # no loader process outlives its attempt
    job.update_wall()
    if (early := leader.early) is not None:  # paused (released), or pruned: best.pt,
        outcome.paused, outcome.pruned = (early[1], None) if early[0] == PAUSE else \
            (None, early[1])  # metrics and curves stay
        return outcome
    reporter.update(phase=Phase.finishing)
    outcome.final_weights_sha256 = store_final(job, seams.store_results)
    outcome.completed = outcome.final_weights_sha256 is not None
    return outcome
