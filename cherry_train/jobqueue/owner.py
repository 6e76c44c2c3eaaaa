"""The writes of an attempt's owner, each fenced first (docs/contract.md §4): once a later
attempt of the job exists, the next write raises Fenced instead of writing. With
$CHERRY_JOURNAL set, every claim and write is also journaled, so a test (or a post-mortem) can
check fencing from the files' history."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import structlog

from cherry_train import faults
from cherry_train.checksums import file_sha256
from cherry_train.jobqueue.claims import Claim
from cherry_train.jobqueue.jobfiles import JobFiles
from cherry_train.schemas import Manifest, Result, WorkerStatus
from cherry_train.storage.base import ReadOnlyStorage

log = structlog.get_logger(__name__)


class Fenced(Exception):
    """A later attempt of this job exists: its owner must stop and write nothing more."""


class Owner:
    """Every write the owner of an attempt makes, fenced first (docs/contract.md §4): once a later
    attempt exists, the next write raises Fenced instead of writing. With $CHERRY_JOURNAL set,
    each write is also journaled, so a test (or a post-mortem) can check fencing from history."""

    def __init__(self, queue: JobFiles, claim: Claim):
        self.queue, self.claim = queue, claim
        self._storage = queue.storage  # written only by the methods below, each fenced
        self.reader = ReadOnlyStorage(queue.storage)  # reads: the job's files, data, other jobs
        self.clock = queue.clock
        self.written: dict[str, tuple[int, str]] = {}  # path -> (bytes, sha256), for results

    # -- what the attempt asks of the queue -------------------------------------------------------

    def cancel_requested(self) -> bool:
        return self.queue.cancel_requested(self.claim.job_id)

    def write_worker_status(self, status: WorkerStatus) -> None:
        self.queue.write_worker_status(status)

    def manifest_of(self, job_id: str) -> Manifest | None:
        """Another job's manifest (evaluation of a trained job), or None."""
        return self.queue.learn(self.queue.manifest(job_id))

    # -- the job's files, each write fenced ----------------------------------------------------

    def fence(self) -> None:
        """Raise Fenced if an attempt later than ours exists."""
        job_id, mine = self.claim.job_id, self.claim.attempt.n
        later = self.queue.later_attempt(job_id, mine)
        if later is not None:
            raise Fenced(f"job {job_id}: attempt {later} took over from attempt {mine}")

    def write(self, path: str, data: bytes) -> None:
        self._fenced(path)
        self._storage.write_atomic(path, data)
        self.written[path] = (len(data), hashlib.sha256(data).hexdigest())

    def upload(self, local: Path, path: str, sha256: str | None = None) -> None:
        """Store a local file at `path`; `sha256`, when the caller has it, saves hashing it again
        (checkpoints are hundreds of MB, hashed on the thread that shares the GIL with training)."""
        self._fenced(path)
        self._storage.upload(local, path)
        self.written[path] = (local.stat().st_size, sha256 or file_sha256(local))

    def delete(self, path: str) -> None:
        self._fenced(path)
        self._storage.delete(path)
        self.written.pop(path, None)

    def describe(self, path: str) -> tuple[int, str] | None:
        """Size and sha256 of a job file: as written by this attempt, else read back (files
        an earlier attempt wrote, such as best weights from before a disconnect)."""
        if path in self.written:
            return self.written[path]
        try:
            data = self._storage.read_bytes(path)
        except FileNotFoundError:
            return None
        return len(data), hashlib.sha256(data).hexdigest()

    def create_result(self, result: Result) -> bool:
        """Create result.json exclusively; True if ours is the result (lifecycle.commit)."""
        path = self.claim.paths.result
        self._fenced(path)
        faults.point("before-commit")
        won = self._storage.create_exclusive(path, result.to_json())
        faults.point("after-commit")
        if won and self._storage.confirms_later and not self._storage.confirm_durable(path):
            log.warning("result.json is written but Drive has not confirmed it yet; the mount "
                        "uploads it later", job_id=self.claim.job_id)
        return won

    def _fenced(self, path: str) -> None:
        started = time.time()
        self.fence()
        journal("write", self.claim.job_id, self.claim.attempt.n, path=path, t=started)


def journal(event: str, job_id: str, attempt: int, **fields) -> None:
    """Append one JSON line to $CHERRY_JOURNAL (O_APPEND: lines from many processes don't mix)."""
    target = os.environ.get("CHERRY_JOURNAL")
    if not target:
        return
    line = json.dumps({"event": event, "job_id": job_id, "attempt": attempt, "pid": os.getpid(),
                       "t": fields.pop("t", time.time()), **fields}) + "\n"
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
