"""When training checkpoints and what it publishes: the whole training state at intervals and
at each epoch's end, best.pt from the very copy of the state its epoch ended with, and at the
end the final weights, tried again while storage refuses them. Writing a checkpoint file, in
the background and verified, is checkpoints/store.py's; resuming from one is here too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import structlog
import torch

from cherry_train import logs
from cherry_train.backoff import Backoff
from cherry_train.jobqueue.owner import Fenced
from cherry_train.schemas import Phase
from cherry_train.worker.checkpoints.state import TrainState
from cherry_train.worker.checkpoints.store import rng_state, set_rng_state, weights_sha256
from cherry_train.worker.reporting.reporter import Reporter
from cherry_train.worker.training.job import TrainingJob

log = structlog.get_logger(__name__)

CHECKPOINT_FORMAT = 1

#: A finished run's weights are worth waiting for: when storing them fails (Drive full, a mount
#: down past its retries), try again for up to 10 minutes, saying so in the heartbeat, before
#: the job fails. The waits double from 5 s, up to 2 minutes.
STORE_RESULTS = Backoff(first=5.0, cap=120.0, give_up_after=600.0)


def save_checkpoint(job: TrainingJob, why: str, best: bool = False) -> None:
    """Queue a copy of the whole training state; it is written in the background. Training
    waits only for the previous checkpoint's write, if that is still going on, and for the copy
    to be queued; the GPU makes it between this step and the next. With `best`, the model's
    weights in that copy are also published as best.pt (before the checkpoint)."""
    started = job.clock()
    job.update_wall()

    def collect() -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": job.model.state_dict(),
            "optimizer": job.optimizer.state_dict(),
            "scheduler": job.scheduler.state_dict(),
            "scaler": job.scaler.state_dict(),
            "state": asdict(job.state),
            "rng": rng_state(),
            "torch_threads": torch.get_num_threads(),
        }

    kernels = job.compilation.take_kernels()

    def before_write(payload: dict[str, Any]) -> None:
        # On the writer thread, after the previous write ended: pending_best is settled.
        pending, job.pending_best = job.pending_best, None
        try:
            job.reporter.sync_metrics()  # first: the resume from this checkpoint keeps them
            if kernels is not None:
                job.reporter.owner.write(job.claim.paths.compiled_kernels, kernels)
            if best or pending is not None:
                payload["state"]["best_weights_sha256"] = \
                    publish_best(job, payload["model"] if best else pending)
        except Fenced:
            raise
        except Exception:  # the checkpoint fails too; what was not stored goes with the next
            job.compilation.put_back(kernels)
            job.pending_best = pending if not best else \
                {k: v.detach().clone() for k, v in payload["model"].items()}
            raise

    job.checkpoints.save_in_background(job.state.global_step, collect, before_write)
    job.last_checkpoint_at = job.clock()
    log.info("checkpoint saved", job_id=job.claim.job_id, step=job.state.global_step, why=why,
             seconds=round(job.clock() - started, 3))  # what training waited


def checkpoint_due(job: TrainingJob) -> bool:
    every = job.cfg.checkpoint
    if every.every_steps and job.state.global_step % every.every_steps == 0:
        return True
    return job.clock() - job.last_checkpoint_at >= every.every_minutes * 60


def fold_running_sums(state: TrainState, loss_sum: torch.Tensor, correct: torch.Tensor) -> None:
    """Move the on-device running sums into the (checkpointed) state."""
    state.epoch_loss_sum += loss_sum.item()
    state.epoch_correct += int(correct.item())
    loss_sum.zero_()
    correct.zero_()


def checkpoint_now(job: TrainingJob, loss_sum: torch.Tensor, correct: torch.Tensor,
                   why: str) -> None:
    """Checkpoint the state as it is, unless the last checkpoint already holds it (right after
    an epoch, say), and wait until it is durable: the job is about to be handed back."""
    fold_running_sums(job.state, loss_sum, correct)
    if job.checkpoints.requested_step != job.state.global_step:
        save_checkpoint(job, why)
    job.checkpoints.wait()


def keep_state(job: TrainingJob, loss_sum: torch.Tensor, correct: torch.Tensor, why: str) -> None:
    """checkpoint_now before the attempt ends by an error; a failure here is logged, and the
    original error goes on."""
    try:
        checkpoint_now(job, loss_sum, correct, why)
    except Fenced:
        raise
    except Exception as e:
        log.warning("could not checkpoint before handing the job back", error=logs.brief(e))


def drain(job: TrainingJob) -> None:
    """Let a background checkpoint write finish when training failed: its error (if any) is
    logged, and the original error is the one reported."""
    try:
        job.checkpoints.wait()
    except Exception as e:
        log.warning("background checkpoint write failed", job_id=job.claim.job_id,
                    error=f"{type(e).__name__}: {e}")


def report_durable(reporter: Reporter):
    def on_durable(step: int, path: str) -> None:
        reporter.update(last_checkpoint=path, last_checkpoint_step=step, storage_error=None)
    return on_durable


def report_failed(reporter: Reporter):
    def on_failed(step: int, error: str) -> None:
        # `cherry status` and `cherry watch` show it
        reporter.update(storage_error=f"checkpoint at step {step} not written ({error}); "
                                      "training goes on")
    return on_failed


def resume(job: TrainingJob) -> None:
    """Load the newest verified checkpoint, if any: model, optimizer, scheduler, scaler,
    training state, every RNG; keep the metrics lines up to it."""
    found = job.checkpoints.load_latest()
    if found is None:
        job.reporter.resume_metrics(up_to_step=0)
        job.state.ranks = job.ranks
        return
    step, payload = found
    job.checkpoints.requested_step = step
    job.model.load_state_dict(payload["model"])
    job.optimizer.load_state_dict(payload["optimizer"])
    job.scheduler.load_state_dict(payload["scheduler"])
    job.scaler.load_state_dict(payload["scaler"])
    job.state = TrainState(**payload["state"])
    job.wall_before = job.state.wall_seconds
    set_rng_state(payload["rng"])
    job.reporter.resume_metrics(up_to_step=step)
    job.reporter.update(last_checkpoint=job.claim.paths.checkpoint(step),
                        last_checkpoint_step=step)
    if job.state.ranks != job.ranks:
        log.warning("resuming on another number of GPUs: training continues from the "
                    "checkpoint, but not bit-identical to a run on one number throughout",
                    checkpoint_ranks=job.state.ranks, ranks=job.ranks, step=step)
        job.state.rank_changes.append({"step": step, "from": job.state.ranks,
                                       "to": job.ranks})
        job.state.ranks = job.ranks
    if payload.get("torch_threads") != torch.get_num_threads():
        log.warning("resuming with another thread count: results may differ in the last bits",
                    saved=payload.get("torch_threads"), now=torch.get_num_threads())
    log.info("resumed from checkpoint", job_id=job.claim.job_id, step=step,
             epoch=job.state.epoch, step_in_epoch=job.state.step_in_epoch)


def publish_best(job: TrainingJob, weights: dict[str, torch.Tensor]) -> str:
    job.state.best_weights_sha256 = publish_weights(job, weights, job.claim.paths.best_weights)
    return job.state.best_weights_sha256


def publish_weights(job: TrainingJob, state_dict: dict[str, torch.Tensor], path: str) -> str:
    """Store a CPU copy of the model's weights at `path`; their hash (weights_sha256)."""
    tmp = job.scratch / (Path(path).name + ".partial")
    job.scratch.mkdir(parents=True, exist_ok=True)
    try:
        torch.save(state_dict, tmp)
        job.reporter.owner.upload(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return weights_sha256(state_dict)


def store_final(job: TrainingJob, backoff: Backoff = STORE_RESULTS) -> str | None:
    """Store what a finished run leaves (best.pt if its checkpoints failed, then final.pt);
    the final weights' hash, or None if the worker was asked to stop meanwhile: the job is then
    handed back (or cancelled), not failed, and the next attempt resumes from the newest
    checkpoint — the finished state, when that one was written.

    No final.pt when the final weights are the best epoch's (the last epoch was the best, as
    in most runs that still learn): best.pt holds them, and a second copy would add a whole
    model to the job's folder. The result then gives both the same hash, and a `final.pt`
    named by a later config is read from best.pt (layout.best_for_final)."""
    if job.pending_best is not None:  # its checkpoints failed: the result needs best.pt
        if _stored(job, "best.pt", lambda: publish_best(job, job.pending_best), backoff) is None:
            return None
        job.pending_best = None
    weights = {k: v.detach().cpu() for k, v in job.model.state_dict().items()}
    digest = weights_sha256(weights)
    if digest == job.state.best_weights_sha256:
        # An earlier attempt may have stored it before it was stopped: one copy is enough.
        try:
            job.reporter.owner.delete(job.claim.paths.final_weights)
        except Fenced:
            raise
        except Exception as e:  # a stray copy left behind, nothing worse: the job is done
            log.warning("could not remove an earlier attempt's final.pt",
                        error=f"{type(e).__name__}: {e}")
        log.info("final weights are the best epoch's: best.pt holds them", sha256=digest)
        return digest
    return _stored(job, "final.pt",
                   lambda: publish_weights(job, weights, job.claim.paths.final_weights), backoff)


def _stored(job: TrainingJob, name: str, store: Callable[[], str], backoff: Backoff) -> str | None:
    """store(), tried again while it fails (see STORE_RESULTS); None if stopped meanwhile."""
    waits = backoff.waits()
    while True:
        try:
            stored = store()
            job.reporter.update(phase=Phase.finishing, storage_error=None)
            return stored
        except Fenced:
            raise
        except Exception as e:
            if job.stop.is_set():
                log.warning("stopped while the job's results could not be stored",
                            file=name, reason=job.stop.reason)
                return None
            wait = next(waits, None)
            if wait is None:
                raise
            error = logs.brief(e)
            log.error("could not store the job's results; trying again", file=name, error=error,
                      retry_in_seconds=wait)
            job.reporter.update(phase=Phase.waiting_for_storage, storage_error=(
                f"{name} not written ({error}); trying again for up to "
                f"{backoff.give_up_after / 60:.0f} minutes before the job fails"))
            job.stop.wait(wait)
