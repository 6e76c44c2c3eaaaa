"""What `cherry status` (and every reader) makes of a job: its state derived from the files
alone, in docs/contract.md §3's order. Reads only; the transitions are in lifecycle.py."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from cherry_train.jobqueue import layout
from cherry_train.jobqueue.clock import age_seconds
from cherry_train.jobqueue.ids import JOB_ID_RE
from cherry_train.jobqueue.jobfiles import JobFiles
from cherry_train.jobqueue.layout import JobPaths
from cherry_train.schemas import (
    Attempt,
    FailedManifest,
    Heartbeat,
    JobState,
    Manifest,
    Result,
    TrainingConfig,
)


@dataclass
class JobView:
    """What `status` knows about one job, derived from the files alone."""

    job_id: str
    state: JobState
    manifest: Manifest | None = None
    attempt: Attempt | None = None
    heartbeat: Heartbeat | None = None
    heartbeat_age: float | None = None
    stalled: bool = False
    result: Result | None = None
    error: str | None = None
    error_type: str | None = None  # why it failed: "JobError" (its config or data), ..., REJECTED
    cancel_requested: bool = False


_DEFAULT_LEASE = TrainingConfig.model_fields["lease_seconds"].default
#: The error type of a job whose manifest no worker could read (in failed/, never claimed).
REJECTED = "RejectedManifest"


def job_view(files: JobFiles, job_id: str) -> JobView:
    """A job's state, in docs/contract.md §3's order: result > failed/ > queue/ with no attempt
    since it was queued (cancelled if a cancel was asked) > attempt."""
    paths, storage = JobPaths(job_id), files.storage
    manifest = files.learn(files.manifest(job_id))
    raw = storage.read_text_or_none(paths.result)
    if raw is not None:
        try:
            result = Result.from_json(raw)
            return JobView(job_id, result.state, manifest=manifest, result=result,
                           error=result.error.message if result.error else None,
                           error_type=result.error.type if result.error else None)
        except (ValidationError, ValueError):
            pass  # being written without hard links: fall through to "running"
    if storage.exists(paths.failed_manifest):
        why = storage.read_text_or_none(paths.failed_error)
        try:
            message = FailedManifest.from_json(why).error.message if why else None
        except (ValidationError, ValueError):
            message = why
        return JobView(job_id, JobState.failed, error=message, error_type=REJECTED)
    history = files.attempts(job_id)
    cancel = files.cancel_requested(job_id)
    if files.unstarted(manifest, history):
        state = JobState.cancelled if cancel else JobState.queued
        return JobView(job_id, state, manifest=manifest, cancel_requested=cancel,
                       attempt=history[-1] if history else None)
    hb = files.heartbeat(job_id)
    hb = hb if hb is not None and hb.attempt == history[-1].n else None
    seen = hb.at if hb is not None else history[-1].started_at
    age = age_seconds(files.clock, seen)
    lease = manifest.config.lease_seconds if manifest else _DEFAULT_LEASE
    return JobView(job_id, JobState.running, manifest=manifest, attempt=history[-1],
                   heartbeat=hb, heartbeat_age=age, cancel_requested=cancel,
                   stalled=age > lease and not (hb is not None and hb.released))


def queued_job_ids(files: JobFiles) -> set[str]:
    """Jobs whose manifest is in queue/: not finished (or put back by `cherry retry`)."""
    return {n[:-5] for n in files.storage.list_dir(layout.QUEUE) if n.endswith(".json")}


def all_job_ids(files: JobFiles) -> list[str]:
    """Every job's id, from the folders' listings. A name that is no job id (Drive allows
    '/' and '..' in names) is no job: it never becomes a folder on the laptop."""
    storage = files.storage
    ids = queued_job_ids(files)
    ids.update(storage.list_dir(layout.DONE))
    ids.update(n[:-5] for n in storage.list_dir(layout.FAILED)
               if n.endswith(".json") and not n.endswith(".error.json"))
    # ids sort by submission time: newest first
    return sorted((i for i in ids if JOB_ID_RE.fullmatch(i)), reverse=True)
