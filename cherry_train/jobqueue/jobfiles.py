"""Reading the queue's records (docs/contract.md §2): a job's manifest, attempts, heartbeat, cancel
request and checkpoints, and the workers' own status files. Nothing here changes a job's state:
the transitions are in lifecycle.py, each read by whoever needs it.
"""

from __future__ import annotations

from pydantic import ValidationError

from cherry_train.jobqueue import layout
from cherry_train.jobqueue.clock import SystemClock
from cherry_train.jobqueue.layout import JobPaths
from cherry_train.schemas import Attempt, Heartbeat, Manifest, WorkerStatus
from cherry_train.storage import Storage


class JobFiles:
    def __init__(self, storage: Storage, clock=None):
        self.storage = storage
        self.clock = clock or SystemClock()

    def learn(self, manifest: Manifest | None) -> Manifest | None:
        """Tell the storage the ids this job's files are to be created with (Drive API roots
        create exclusively through ids reserved at submission; elsewhere there are none)."""
        if manifest is not None and manifest.reserved_ids:
            self.storage.use_ids(manifest.reserved_ids)
        return manifest

    def manifest(self, job_id: str) -> Manifest | None:
        """The job's manifest, queued or beside its result; None if missing or unreadable."""
        paths = JobPaths(job_id)
        for path in (paths.queued_manifest, paths.done_manifest):
            try:
                return Manifest.from_json(self.storage.read_bytes(path))
            except FileNotFoundError:
                continue
            except (ValidationError, ValueError):
                return None
        return None

    def known(self, job_id: str) -> bool:
        p = JobPaths(job_id)
        return any(self.storage.exists(x) for x in (p.queued_manifest, p.dir, p.failed_manifest))

    def attempts(self, job_id: str) -> list[Attempt]:
        paths = JobPaths(job_id)
        found = []
        for name in self.storage.list_dir(paths.attempts_dir):
            stem = name.removesuffix(".json")
            if not stem.isdigit():
                continue
            path = paths.attempt(int(stem))
            try:
                attempt = Attempt.from_json(self.storage.read_bytes(path))
                found.append(attempt)
                if attempt.next_id:
                    self.storage.use_ids({paths.attempt(attempt.n + 1): attempt.next_id})
            except (FileNotFoundError, ValidationError, ValueError):
                # A record being created without hard links may be briefly short; its number
                # still counts (fencing and numbering never go backwards), and its age is the
                # file's, so nobody takes the job over from a claim in progress.
                info = self.storage.stat(path)
                found.append(Attempt(n=int(stem), worker_id="?", incarnation="?",
                                     started_at=info.modified if info else self.clock.now()))
        return sorted(found, key=lambda a: a.n)

    def later_attempt(self, job_id: str, attempt: int) -> int | None:
        """The number of an attempt later than `attempt`, if one exists (fencing)."""
        for name in self.storage.list_dir(JobPaths(job_id).attempts_dir):
            stem = name.removesuffix(".json")
            if stem.isdigit() and int(stem) > attempt:
                return int(stem)
        return None

    def heartbeat(self, job_id: str) -> Heartbeat | None:
        try:
            return Heartbeat.from_json(self.storage.read_bytes(JobPaths(job_id).heartbeat))
        except (FileNotFoundError, ValidationError, ValueError):
            return None

    def cancel_requested(self, job_id: str) -> bool:
        return self.storage.exists(JobPaths(job_id).cancel_request)

    @staticmethod
    def unstarted(manifest: Manifest | None, history: list[Attempt]) -> bool:
        """No attempt since the job was queued, or queued again by `cherry retry`: a cancel
        request then ends it before it starts (it is `cancelled` already, and retryable)."""
        return not history or (manifest is not None
                               and manifest.retried_after_attempt == history[-1].n)

    def cancelled_before_start(self, job_id: str, manifest: Manifest | None) -> bool:
        return self.cancel_requested(job_id) and self.unstarted(manifest, self.attempts(job_id))

    def latest_checkpoint_step(self, job_id: str) -> int | None:
        """The newest checkpoint that was finished (has its checksum), by name only."""
        names = set(self.storage.list_dir(JobPaths(job_id).checkpoints_dir))
        steps = [s for n in names if (s := layout.checkpoint_step(n)) is not None
                 and f"{n}.sha256" in names]
        return max(steps, default=None)

    def footprint(self, job_id: str) -> tuple[int, int]:
        """Bytes a job's folder holds, and how many of them are checkpoints (two listings)."""
        paths = JobPaths(job_id)
        files = sum(i.size for i in self.storage.list_entries(paths.dir).values() if not i.is_dir)
        checkpoints = sum(i.size for i in self.storage.list_entries(paths.checkpoints_dir).values()
                          if not i.is_dir)
        return files + checkpoints, checkpoints

    # -- the workers' own status files -----------------------------------------------------------

    def write_worker_status(self, status: WorkerStatus) -> None:
        self.storage.write_atomic(layout.worker_status_path(status.worker_id), status.to_json())

    def worker_status(self, worker_id: str) -> WorkerStatus | None:
        try:
            return WorkerStatus.from_json(
                self.storage.read_bytes(layout.worker_status_path(worker_id)))
        except (FileNotFoundError, ValidationError, ValueError):
            return None

    def workers(self) -> list[WorkerStatus]:
        found = []
        for name in self.storage.list_dir(layout.WORKERS):
            if name.endswith(".json") and (ws := self.worker_status(name[:-5])) is not None:
                found.append(ws)
        return found
