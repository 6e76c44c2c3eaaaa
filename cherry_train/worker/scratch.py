"""Scratch: the worker's local disk, never the queue root. torch.save must not write through a
flaky mount; publishing is then one copy (or a rename, on the same file system), and retryable.

<scratch>/<worker id>-<hash of root and id>/<pid>-<incarnation>/<job id>/: a worker with the same
id on another root (the default id is the host name) has its own; what a killed process left
is removed by the next one. <scratch> is by default `cherry-train-scratch-<uid>` in the temp
folder (a shared /tmp, under a name anyone can guess): this user's alone, mode 0700, and refused
if someone else made it first.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
from pathlib import Path

import structlog

from cherry_train.jobqueue.claims import WorkerIdentity

log = structlog.get_logger(__name__)


class UnsafeScratch(Exception):
    """The scratch folder in the shared temp folder is not this user's alone."""


def private_folder(path: Path) -> Path:
    """`path` as a folder only this user can enter (0700), made if missing. Someone else may
    have made it first (to read checkpoints, or to plant a link that redirects them): one that
    is a link, not a folder, or not ours is refused; ours with looser permissions is tightened.
    Checked through one descriptor opened without following links, so nothing can be swapped
    in between the check and the change."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:  # ELOOP: a link; ENOTDIR: a file
        raise UnsafeScratch(f"scratch folder {path} is not a folder of yours ({e.strerror}); "
                            "remove it, or start the worker with TMPDIR set to a folder of "
                            "your own") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid():
            raise UnsafeScratch(f"scratch folder {path} belongs to uid {st.st_uid}, not to you "
                                f"(uid {os.getuid()}): someone else made it; remove it, or "
                                "start the worker with TMPDIR set to a folder of your own")
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, 0o700)
            log.warning("scratch folder was open to others; made private (0700)",
                        path=str(path), mode=oct(stat.S_IMODE(st.st_mode)))
    finally:
        os.close(fd)
    return path


class Scratch:
    def __init__(self, folder: Path | None, root_description: str, me: WorkerIdentity):
        self.folder, self.root_description, self.me = folder, root_description, me

    def top(self) -> Path:
        """The given folder, or this user's own in the temp folder."""
        return self.folder or Path(tempfile.gettempdir()) / f"cherry-train-scratch-{os.getuid()}"

    def base(self) -> Path:
        """This worker id's scratch on this root: <scratch>/<worker id>-<hash of root and id>.
        A worker with the same id on another root (the default id is the host name) has its
        own, and never touches this one."""
        key = hashlib.sha256(f"{self.root_description}\n{self.me.worker_id}".encode())
        return self.top() / f"{self.me.worker_id}-{key.hexdigest()[:12]}"

    def private(self) -> None:
        """Before anything is made in scratch (at start, and before each job: an empty one is
        removed between jobs): the default folder is made, or checked to be, this user's alone.
        A folder given by the caller is the caller's to choose."""
        if self.folder is None:
            private_folder(self.top())

    def mine(self) -> Path:
        """One folder per process (pid, incarnation): what it left is known to be a dead
        process's once that pid is gone."""
        return self.base() / f"{self.me.pid}-{self.me.incarnation}"

    def for_job(self, job_id: str) -> Path:
        self.private()
        return self.mine() / job_id

    def clear_dead(self) -> None:
        """Remove what dead incarnations of this worker on this root left in scratch (a
        checkpoint being written when SIGKILL came: hundreds of MB each on a ResNet-50): the
        folders of processes no longer alive on this host. Checks first that scratch is ours."""
        self.private()
        base = self.base()
        dead = [p for p in base.iterdir() if not _alive(p.name)] if base.is_dir() else []
        if dead:
            log.info("removing a killed worker's scratch files", path=str(base),
                     jobs=sorted(j.name for p in dead if p.is_dir() for j in p.iterdir()))
        for folder in dead:
            shutil.rmtree(folder, ignore_errors=True)

    def remove(self) -> None:
        """At exit: this process's scratch, and this worker id's folder once it is empty. The
        top stays: given (--scratch), it is the user's; the default, private one, removed, would
        hand its guessable name in the shared /tmp to whoever makes it first."""
        mine = self.mine()
        shutil.rmtree(mine, ignore_errors=True)
        with contextlib.suppress(OSError):  # not empty (another incarnation) or gone already
            mine.parent.rmdir()


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
