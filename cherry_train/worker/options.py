"""What a worker is told at its start (`cherry worker`'s options) and the loop's defaults, each
with why it is what it is."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cherry_train.schemas.requires import Capabilities
from cherry_train.worker import colabsession
from cherry_train.worker.checkpoints.kernelseal import KernelSeal

#: Idle polling starts fast (a job submitted right after start is taken at once) and backs off
#: to a poll every 30 s, which costs an idle Drive folder almost nothing.
POLL_MIN_SECONDS = 1.0
POLL_MAX_SECONDS = 30.0
#: An idle worker refreshes its status file every this many longest poll waits, and no more
#: often than once a minute (`--poll-seconds 2` rewrote it every 4 s: 15 requests a minute on a
#: Drive API root). A poll is then one request (the listing of queue/), the status one a minute.
STATUS_IDLE_POLLS = 2
STATUS_IDLE_SECONDS = 60.0
#: An idle worker says it waits at once, then every this many seconds.
IDLE_LINE_SECONDS = 300.0
#: An idle worker looks for sweeps short of trials in flight this often.
SWEEP_CHECK_SECONDS = 60.0
#: The exit code of a worker that stopped because its GPU failed (EX_TEMPFAIL: start it again).
EXIT_GPU_FAILED = 75


@dataclass
class WorkerOptions:
    exit_when_idle: bool = False
    poll_min_seconds: float = POLL_MIN_SECONDS
    poll_max_seconds: float = POLL_MAX_SECONDS
    progress_bar: bool = False
    scratch: Path | None = None  # local folder for checkpoints before they are published
    idle_shutdown_minutes: float | None = None  # then release the runtime (Colab) and exit
    max_runtime_hours: float | None = None  # the session cap: release jobs in time, then exit
    release_runtime: Callable[[], None] = colabsession.release_runtime
    gpus: int | None = None  # ranks per job (--gpus); None: every visible GPU
    kernel_seal: KernelSeal = field(default_factory=lambda: KernelSeal(None))  # kernelseal.py
    capabilities: Capabilities | None = None  # what jobs may require (None: not measured)
    webhook: str | None = None  # told every job's end (--webhook), besides the config's own
