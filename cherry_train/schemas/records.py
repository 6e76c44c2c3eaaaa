"""The JSON records the queue is made of: manifest, attempt, heartbeat, result, worker status.

Each is written by exactly one party (docs/contract.md §4) and read by everyone, so unknown keys are
ignored on read: an older client can show a newer worker's files.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cherry_train.schemas.config import ID_PATTERN, TrainingConfig
from cherry_train.schemas.requires import Capabilities
from cherry_train.schemas.sweep import SweepRef

SCHEMA_VERSION = 1


class Word(str, Enum):
    """A word written in a record and shown to people as it is ("training", not
    "Phase.training"), on every Python (3.12 changed how mixed-in enums format)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class JobState(Word):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    pruned = "pruned"  # a sweep trial stopped early by the sweep's early_stop rule

    @property
    def finished(self) -> bool:
        return self in FINISHED

    @property
    def retryable(self) -> bool:
        """`cherry retry` puts it back in the queue."""
        return self in (JobState.failed, JobState.cancelled)


#: The states a result records: the job is over.
FINISHED = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled, JobState.pruned})


class AttemptReason(Word):
    """Why an attempt was started (docs/contract.md §3)."""

    fresh = "fresh"  # the job's first attempt
    released = "released"  # the previous owner stopped on purpose (signal, runtime cap)
    after_error = "after-error"  # the previous owner handed the job back after an error
    same_worker = "same-worker"  # our worker id's previous process went silent (disconnect)
    lease_expired = "lease-expired"  # another worker went silent for longer than the lease
    retried = "retried"  # `cherry retry` put the finished job back in the queue


class Phase(Word):
    """What the owner of a job is doing, as its heartbeat says (`cherry status` shows it)."""

    starting = "starting"  # set up, or resumed, and about to train
    copying_data = "copying data"
    compiling = "compiling"
    training = "training"
    validating = "validating"
    paused = "paused at a rung"  # a sweep trial below ASHA's cut, released until promoted
    evaluating = "evaluating"  # mode: evaluation
    finishing = "finishing"  # storing final weights
    waiting_for_storage = "waiting for storage"  # final weights refused (Drive full): retrying
    released = "released"  # handed back: the next claim resumes it
    finished = "finished"  # the result follows


class WorkerState(Word):
    """What a worker's status file says it does."""

    idle = "idle"
    busy = "busy"
    draining = "draining"  # asked to drain: finishes its job (if any), takes no new one, exits
    stopped = "stopped"


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore")

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes | str):
        return cls.model_validate_json(data)


class Manifest(_Record):
    """Written once by the client into queue/<job_id>.json."""

    schema_version: int = SCHEMA_VERSION
    job_id: str = Field(pattern=ID_PATTERN)  # a file name here and on the laptop: never a path
    name: str
    priority: int = 0
    submitted_at: datetime
    submitted_by: str = ""
    config_file: str = ""
    client_version: str = ""
    config: TrainingConfig
    #: Root-relative path -> the id to create it with, on backends whose exclusive create needs
    #: reserved ids (Drive API): the job's folders, attempts/1.json, result.json, the cancel
    #: request. Empty for local folders.
    reserved_ids: dict[str, str] = Field(default_factory=dict)
    #: A sweep's trial: its sweep, number and values (None for a job of its own).
    sweep: SweepRef | None = None
    #: Set by `cherry retry`: the attempts up to this one ended in a result that was put aside;
    #: the next attempt resumes from the newest checkpoint with the crash-loop count afresh.
    retried_after_attempt: int | None = None


class ErrorInfo(_Record):
    type: str
    message: str
    traceback: str | None = None  # for bugs; a user error (bad data path) needs no traceback


class AttemptEnd(_Record):
    """How an attempt ended, as its last heartbeat told the worker that claimed the job next
    (a killed process writes nothing more, so this is all there is to know)."""

    phase: Phase | str | None = None  # None: it never wrote a heartbeat; str: a newer word
    step: int = 0
    trained: bool = False  # it took at least one training step
    released: bool = False  # it handed the job back (on request, or after an error)
    error: ErrorInfo | None = None  # why it handed the job back, when an error ended it
    loader_processes: int | None = None  # how many it used


class Attempt(_Record):
    """done/<job_id>/attempts/<n>.json. Creating it exclusively is the claim."""

    n: int = Field(ge=1)
    worker_id: str
    incarnation: str  # one per worker process: tells a restarted worker from a second tab
    host: str = ""
    pid: int = 0
    started_at: datetime
    reason: AttemptReason = AttemptReason.fresh
    checkpoint_at_start: int | None = None  # global step of the newest checkpoint when claimed
    next_id: str | None = None  # reserved id for attempts/<n+1>.json (Drive API roots)
    previous: AttemptEnd | None = None  # how attempt n-1 ended (None for the first)


class Heartbeat(_Record):
    """done/<job_id>/heartbeat.json: progress of the owning attempt, rewritten periodically."""

    job_id: str
    attempt: int
    worker_id: str
    at: datetime
    # A newer worker's word for a phase is kept as it is: readers show it, never reject it.
    phase: Phase | str = Phase.starting
    released: bool = False  # the owner handed the job back: the next worker may take it now
    # Why the owner handed the job back, when an error (not a stop request) ended the attempt:
    # `cherry status` shows it while the job waits; the next attempt records it in its history.
    error: ErrorInfo | None = None
    trained: bool = False  # this attempt took a training step (written at once when it does)
    loader_processes: int | None = None  # data loader processes this attempt uses
    epoch: int = 0  # the epoch in progress, 1-based (0: not started)
    epochs: int = 0
    step: int = 0  # global optimizer steps done
    steps_per_epoch: int = 0
    loss: float | None = None  # mean train loss over the epoch so far
    accuracy: float | None = None  # train accuracy over the epoch so far
    images_per_second: float | None = None
    eta_seconds: float | None = None
    last_checkpoint: str | None = None
    last_checkpoint_step: int | None = None
    # What could not be written to the queue root, and why (Drive full, say): the newest
    # checkpoint (training goes on; a resume would start from last_checkpoint_step) or, at the
    # end, the final weights (tried again for a while). Cleared once a write succeeds.
    storage_error: str | None = None
    best_val_accuracy: float | None = None
    device: str | None = None


class BestEpoch(_Record):
    epoch: int  # 1-based, as every epoch a person reads
    val_accuracy: float
    val_loss: float


class Artifact(_Record):
    path: str  # relative to done/<job_id>/
    bytes: int
    sha256: str


class Result(_Record):
    """done/<job_id>/result.json: created exclusively and last. Its existence ends the job."""

    schema_version: int = SCHEMA_VERSION
    job_id: str
    state: JobState
    attempts: int
    attempt_history: list[Attempt] = []
    finished_at: datetime
    worker_id: str = ""
    error: ErrorInfo | None = None
    best: BestEpoch | None = None
    epochs_completed: int = 0
    epochs: int | None = None  # as configured
    steps_completed: int = 0
    wall_seconds: float = 0.0  # this job's training time, summed over attempts
    images_per_second: float | None = None
    device: str | None = None
    amp: str | None = None
    torch_threads: int | None = None
    torch_version: str | None = None
    final_weights_sha256: str | None = None
    best_weights_sha256: str | None = None
    final_metrics: dict[str, float] = {}
    gpu_hours: float | None = None  # training wall time x GPUs, over all attempts
    ranks: int = 1  # processes that trained it together, one per GPU (--gpus)
    rank_changes: list[dict[str, int]] = []  # resumed on another number of ranks: step, from, to
    compute_units: float | None = None  # gpu_hours x an approximate Colab rate for the GPU
    micro_batch: int | None = None  # < batch_size: gradient accumulation after CUDA OOM
    oom_backoffs: list[dict[str, int]] = []  # step and new micro-batch of each back-off
    dataset_sha256: str | None = None  # the content hash of the data the model saw
    evaluation: dict[str, Any] | None = None  # mode: evaluation (also in evaluation.json)
    pruned: dict[str, Any] | None = None  # state pruned: the rule, the epoch, the figures used
    export: dict[str, Any] | None = None  # {"onnx": sha256, opset, parity figures, or error}
    data_cache: dict[str, Any] = {}  # per folder (or archive): files, bytes, copy time, reuse
    artifacts: dict[str, Artifact] = {}  # what -> file, with its size and checksum


class WorkerStatus(_Record):
    """workers/<worker_id>.json: each worker's own heartbeat."""

    worker_id: str
    incarnation: str
    at: datetime
    state: WorkerState | str  # str: a newer worker's word
    interval_seconds: float = 30.0  # it writes this file again within this long, while alive
    host: str = ""
    pid: int = 0
    device: str | None = None
    job_id: str | None = None
    version: str = ""
    capabilities: Capabilities | None = None  # what its jobs may require (None: not told)


class FailedManifest(_Record):
    """failed/<job_id>.error.json, beside a manifest that could never be claimed."""

    job_id: str
    at: datetime
    worker_id: str
    error: ErrorInfo
    extra: dict[str, Any] = {}


class SweepRecord(_Record):
    """sweeps/<sweep_id>/sweep.json: written once by the client; what every trial comes from."""

    schema_version: int = SCHEMA_VERSION
    sweep_id: str
    name: str
    submitted_at: datetime
    submitted_by: str = ""
    config_file: str = ""
    client_version: str = ""
    config: TrainingConfig  # the base config, with its sweep section
    trials: int  # how many trials the sweep makes in all


class TrialRecord(_Record):
    """sweeps/<sweep_id>/trials/<n>.json: creating it exclusively makes trial n; its job follows."""

    sweep_id: str
    n: int = Field(ge=1)
    job_id: str = Field(pattern=ID_PATTERN)  # the trial's job is submitted under this id
    params: dict[str, Any]
    created_at: datetime
    created_by: str = ""
