"""What the worker writes for a job besides training: its resolved config first, its result
record last (with the artifacts' sizes and checksums, which `cherry fetch` verifies)."""

from __future__ import annotations

from datetime import datetime

import structlog
import yaml

from cherry_train.jobqueue.claims import Claim
from cherry_train.jobqueue.lifecycle import error_info
from cherry_train.jobqueue.owner import Owner
from cherry_train.schemas import Artifact, BestEpoch, JobState, Result
from cherry_train.worker import colabsession
from cherry_train.worker.outcome import Outcome

log = structlog.get_logger(__name__)


def resolved_yaml(claim: Claim) -> bytes:
    header = (f"# The fully resolved config of job {claim.job_id} (all defaults filled in).\n")
    body = yaml.safe_dump(claim.manifest.config.model_dump(mode="json"), sort_keys=False)
    return (header + body).encode()


def result_of(claim: Claim, outcome: Outcome, job_state: JobState, now: datetime) -> Result:
    """The result of a job that trained (to the end, or until cancelled)."""
    state = outcome.state
    on_gpu = outcome.device is not None and not outcome.device.startswith("CPU")
    gpu_hours = state.wall_seconds / 3600 * state.ranks if on_gpu else 0.0  # every GPU counts
    best = BestEpoch(**state.best) if state.best else None
    return Result(
        job_id=claim.job_id, state=job_state, attempts=claim.attempt.n,
        attempt_history=claim.history, finished_at=now, worker_id=claim.attempt.worker_id,
        best=best, epochs_completed=state.epoch, steps_completed=state.global_step,
        wall_seconds=round(state.wall_seconds, 3),
        images_per_second=round(state.images_seen / state.train_seconds, 1)
        if state.train_seconds else None,
        device=outcome.device, amp=outcome.precision, torch_threads=outcome.threads,
        torch_version=torch_version(), final_weights_sha256=outcome.final_weights_sha256,
        best_weights_sha256=state.best_weights_sha256, final_metrics=state.last_epoch,
        epochs=claim.manifest.config.epochs, evaluation=outcome.evaluation,
        micro_batch=state.micro_batch or None, oom_backoffs=state.oom_backoffs,
        ranks=state.ranks, rank_changes=state.rank_changes,
        gpu_hours=round(gpu_hours, 4),
        compute_units=colabsession.compute_units(outcome.device, gpu_hours),
        dataset_sha256=outcome.data.get("dataset_sha256"), pruned=outcome.pruned,
        export=outcome.export,
        data_cache={k: v for k, v in outcome.data.items() if k != "dataset_sha256"})


def failed_result(claim: Claim, error: Exception, now: datetime, with_traceback: bool,
            state: JobState = JobState.failed) -> Result:
    return Result(job_id=claim.job_id, state=state, attempts=claim.attempt.n,
                  attempt_history=claim.history, finished_at=now,
                  worker_id=claim.attempt.worker_id,
                  error=error_info(error, with_traceback=with_traceback))


def artifacts(owner: Owner) -> dict[str, Artifact]:
    """The job's files for people, with size and sha256 (what `cherry fetch` verifies)."""
    paths, found = owner.claim.paths, {}
    for name, path in paths.artifact_paths().items():
        described = owner.describe(path)
        if described is not None:
            found[name] = Artifact(path=path.removeprefix(paths.dir + "/"), bytes=described[0],
                                   sha256=described[1])
    return found


def torch_version() -> str | None:
    import torch

    return torch.__version__
