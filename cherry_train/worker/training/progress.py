"""What training tells people as it goes: the epoch's progress bar, a metrics line every
log_every_steps, and the heartbeat's progress (`cherry status`, `cherry watch`)."""

from __future__ import annotations

import structlog
import torch

from cherry_train.schemas import Phase
from cherry_train.worker.training.job import TrainingJob
from cherry_train.worker.training.saving import fold_running_sums

log = structlog.get_logger(__name__)


def progress(enabled: bool, job: TrainingJob, total: int, done: int):
    """The epoch's bar, from where this attempt starts in it (17/37 after a resume, not 1/20)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, unit="step", leave=False, dynamic_ncols=True,
                desc=f"epoch {job.state.epoch + 1}/{job.cfg.training.epochs}")


def first_step(job: TrainingJob) -> None:
    """From set-up to the first step, and to its batch (decoding, loader start-up; the rest
    is the step: cuDNN's choice of kernels, compiling). Said at once (one heartbeat per
    attempt on this thread): an attempt that dies from here on counts as a crash of training,
    before as a death in set-up (jobqueue.lifecycle)."""
    job.first_step_done = True
    log.info("first step", seconds=round(job.clock() - job.attempt_started_at, 1),
             first_batch_seconds=round((job.first_batch_at or job.clock())
                                       - job.attempt_started_at, 1))
    job.reporter.update(phase=Phase.training, trained=True, epoch=job.state.epoch + 1,
                        step=job.state.global_step)
    job.reporter.beat_now()


def log_progress(job: TrainingJob, loss_sum: torch.Tensor, correct: torch.Tensor,
                  window: tuple[float, int], bar) -> tuple[float, int]:
    """A metrics line and the heartbeat's progress (one host sync, only here); a new window."""
    state = job.state
    fold_running_sums(state, loss_sum, correct)
    elapsed = job.clock() - window[0]
    ips = window[1] / elapsed if elapsed > 0 else None
    train_loss = state.epoch_loss_sum / max(1, state.epoch_seen)
    job.reporter.metric({"kind": "train", "epoch": state.epoch + 1, "step": state.global_step,
                         "loss": round(train_loss, 6), "lr": job.scheduler.get_last_lr()[0],
                         "images_per_second": round(ips, 1) if ips else None})
    steps_per_s = state.global_step / max(state.train_seconds, 1e-9)
    job.reporter.update(phase=Phase.training, epoch=state.epoch + 1, step=state.global_step,
                        loss=train_loss, accuracy=state.epoch_correct / max(1, state.epoch_seen),
                        images_per_second=ips,
                        eta_seconds=job.steps_left / steps_per_s if steps_per_s else None)
    if bar is not None:
        bar.set_postfix(loss=f"{train_loss:.4f}", refresh=False)
    return job.clock(), 0
