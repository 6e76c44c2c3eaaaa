"""The contract between the worker loop and whoever runs an attempt (the trainer, the
evaluator, a test's fake): what it is handed (JobRun), what it returns (Outcome), and the
interface itself (Runner). Torch-free, so queue tests can fake a trainer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cherry_train.jobqueue.claims import Claim
from cherry_train.worker.checkpoints.kernelseal import KernelSeal
from cherry_train.worker.checkpoints.state import TrainState
from cherry_train.worker.reporting.reporter import Reporter
from cherry_train.worker.signals import StopRequest


@dataclass
class Outcome:
    completed: bool  # False: stopped on request after a checkpoint; the job goes on elsewhere
    state: TrainState
    device: str
    precision: str
    threads: int
    final_weights_sha256: str | None = None
    data: dict[str, Any] = field(default_factory=dict)  # dataset_sha256 and the cache reports
    evaluation: dict[str, Any] | None = None  # mode: evaluation's findings
    pruned: dict[str, Any] | None = None  # a sweep trial stopped early: the rule's decision
    paused: dict[str, Any] | None = None  # a sweep trial paused at an ASHA rung: released
    export: dict[str, Any] | None = None  # model.onnx: its figures, or why there is none


@dataclass
class JobRun:
    """What the worker hands whoever runs one attempt of a job."""

    claim: Claim
    reporter: Reporter  # heartbeats, metrics, the owner's fenced writes (reporter.owner)
    stop: StopRequest  # checked at every step: a signal, a cancel, the runtime cap, a takeover
    scratch: Path  # this attempt's own local folder, emptied before and after
    data_root: Path | None  # the queue root's local folder: relative data paths start there
    progress_bar: bool = False
    gpus: int | None = None  # ranks to train over (--gpus); None: every visible GPU
    kernel_seal: KernelSeal = field(default_factory=lambda: KernelSeal(None))  # the workers' key


class Runner(Protocol):
    """Runs one attempt: returns an Outcome (completed, or stopped after a checkpoint on
    request); raises JobError for the job's own faults, anything else to hand the job back."""

    def __call__(self, run: JobRun) -> Outcome: ...
