"""Scratch: the worker's local disk, never the queue root. torch.save must not write through a
flaky mount; publishing is then one copy (or a rename, on the same file system), and retryable.

<scratch>/<worker id>-<hash of root and id>/<pid>-<incarnation>/<job id>/: a worker with the same
id on another root (the default id is the host name) has its own; what a killed process left
is removed by the next one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import structlog

from cherry_train.jobqueue.claims import WorkerIdentity

log = structlog.get_logger(__name__)


class Scratch:
    def __init__(self, folder: Path | None, root_description: str, me: WorkerIdentity):
        self.folder, self.root_description, self.me = folder, root_description, me

    def base(self) -> Path:
        """This worker id's scratch on this root: <scratch>/<worker id>-<hash of root and id>.
        A worker with the same id on another root (the default id is the host name) has its
        own, and never touches this one."""
        base = self.folder or Path(tempfile.gettempdir()) / "cherry-train-scratch"
        key = hashlib.sha256(f"{self.root_description}\n{self.me.worker_id}".encode())
        return base / f"{self.me.worker_id}-{key.hexdigest()[:12]}"

    def mine(self) -> Path:
        """One folder per process (pid, incarnation): what it left is known to be a dead
        process's once that pid is gone."""
        return self.base() / f"{self.me.pid}-{self.me.incarnation}"

    def for_job(self, job_id: str) -> Path:
        return self.mine() / job_id

    def clear_dead(self) -> None:
        """Remove what dead incarnations of this worker on this root left in scratch (a
        checkpoint being written when SIGKILL came: hundreds of MB each on a ResNet-50): the
        folders of processes no longer alive on this host."""
        base = self.base()
        dead = [p for p in base.iterdir() if not _alive(p.name)] if base.is_dir() else []
        if dead:
            log.info("removing a killed worker's scratch files", path=str(base),
                     jobs=sorted(j.name for p in dead if p.is_dir() for j in p.iterdir()))
        for folder in dead:
            shutil.rmtree(folder, ignore_errors=True)

    def remove(self) -> None:
        """At exit: this process's scratch, and the folders above it once they are empty."""
        mine = self.mine()
        shutil.rmtree(mine, ignore_errors=True)
        for folder in (mine.parent, mine.parent.parent):
            try:
                folder.rmdir()
            except OSError:
                break  # not empty (another incarnation, another worker) or gone already


def _alive(scratch_name: str) -> bool:
    """Whether the process that owns a scratch folder ("<pid>-<incarnation>") runs on this
    host. A pid taken over by another process reads as alive: its folder is left alone."""
    pid = scratch_name.split("-", 1)[0]
    if not pid.isdigit():
        return True  # not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
