"""Who a worker process is, and the job it holds: the two facts every transition is about."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field

from cherry_train.jobqueue.layout import JobPaths
from cherry_train.schemas import Attempt, Manifest


@dataclass(frozen=True)
class WorkerIdentity:
    worker_id: str
    incarnation: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)


@dataclass
class Claim:
    """A job this worker now owns, as attempt `attempt.n`."""

    manifest: Manifest
    attempt: Attempt
    history: list[Attempt]  # every attempt of this job, this one last

    @property
    def job_id(self) -> str:
        return self.manifest.job_id

    @property
    def paths(self) -> JobPaths:
        return JobPaths(self.manifest.job_id)


def gone_from_here(host: str | None, pid: int | None, me: WorkerIdentity) -> bool:
    """A process of ours that ran on this host and no longer exists: proof that a fresh
    heartbeat under our worker id is a ghost's, not a second live worker's."""
    if not host or host != me.host or not pid or pid == me.pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def default_worker_id() -> str:
    """The host name, as a worker id allows (the Colab VM's, a laptop's)."""
    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())
    return (host.strip("-._") or "worker")[:64]
