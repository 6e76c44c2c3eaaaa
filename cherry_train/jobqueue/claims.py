"""Who a worker process is, and the job it holds: the two facts every transition is about."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime

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


def still_running_here(host: str | None, pid: int | None, at: datetime,
                       me: WorkerIdentity) -> bool:
    """Whether the process that wrote a record at `at` on this host runs still: its pid is
    alive and that process started before `at` (a pid reused since started after it). False
    when that cannot be told (another host, no `ps` here): then watch the record instead."""
    if not host or host != me.host or not pid or pid == me.pid:
        return False
    started = process_started_at(pid)
    return started is not None and started <= at.timestamp()


def process_started_at(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), or None if it is gone or this
    machine does not say. Linux: /proc; elsewhere (macOS): ps, to the second."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after the command's name
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None  # Linux, and no such process
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    try:
        out = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True,
                             text=True, timeout=10, env={**os.environ, "LC_ALL": "C"}).stdout
        return time.mktime(time.strptime(" ".join(out.split()), "%a %b %d %H:%M:%S %Y"))
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def default_worker_id() -> str:
    """The host name, as a worker id allows (the Colab VM's, a laptop's)."""
    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())
    return (host.strip("-._") or "worker")[:64]
