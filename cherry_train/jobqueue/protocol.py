"""The job lifecycle of DESIGN.md §3, built on the storage primitives. All transitions live here.

queued --claim--> running --commit--> succeeded | failed | cancelled

A claim is the exclusive creation of `attempts/<n>.json`; a commit is the exclusive creation of
`result.json`. Everything else (moving the manifest, heartbeats) is bookkeeping that the next
worker completes if a crash interrupts it.
"""

from __future__ import annotations

import json
import os
import socket
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from pydantic import ValidationError

from cherry_train import faults
from cherry_train.jobqueue import layout
from cherry_train.jobqueue.clock import SystemClock, age_seconds
from cherry_train.jobqueue.ids import new_job_id
from cherry_train.jobqueue.layout import JobPaths
from cherry_train.jobqueue.owner import Fenced, journal
from cherry_train.schemas import (
    Attempt,
    AttemptEnd,
    AttemptReason,
    ErrorInfo,
    FailedManifest,
    Heartbeat,
    JobState,
    Manifest,
    Result,
    TrainingConfig,
    WorkerStatus,
)
from cherry_train.storage import Storage

if TYPE_CHECKING:
    from cherry_train.jobqueue.owner import Owner


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


class WorkerIdInUse(Exception):
    """Another live process already works under this worker id (a second notebook tab?)."""


class NotRetryable(Exception):
    """`cherry retry` of a job that is not failed or cancelled: one line for the user."""


def setup_death_bound(max_attempts: int) -> int:
    """Consecutive attempts that died before their first training step (in set-up: data copy,
    model build) before the job fails. Larger than max_attempts: on Colab such deaths are
    mostly a closed tab or a disconnect, not the job; still bounded, so a job whose set-up
    kills its worker every time ends."""
    return max(10, 3 * max_attempts)


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
    cancel_requested: bool = False


def _concise(error: ValidationError) -> str:
    """One line about a manifest pydantic rejected (it may not even be JSON)."""
    parts = [f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}"
             for e in error.errors(include_url=False)[:3]]
    more = len(error.errors()) - 3
    return "not a valid manifest: " + "; ".join(parts).removeprefix("file: ") + \
        (f"; and {more} more" if more > 0 else "")


def error_info(exc: BaseException, with_traceback: bool = True) -> ErrorInfo:
    tb = "".join(traceback.format_exception(exc)) if with_traceback else None
    return ErrorInfo(type=type(exc).__name__, message=str(exc) or type(exc).__name__, traceback=tb)


def _ending(hb: Heartbeat | None) -> AttemptEnd:
    """How the last attempt ended, from its last heartbeat (a killed one writes no more)."""
    if hb is None:
        return AttemptEnd()
    return AttemptEnd(phase=hb.phase, step=hb.step, trained=hb.trained, released=hb.released,
                      error=hb.error, loader_processes=hb.loader_processes)


def _attempts_without_progress(history: list[Attempt], checkpoint: int | None,
                               last_end: AttemptEnd | None,
                               retried_after: int | None) -> tuple[int, int]:
    """Consecutive latest attempts that ended without a new checkpoint (a crash loop), as
    (crashes, set-up deaths). A crash: the attempt trained, or handed the job back after an
    error. A set-up death: the process died silently before its first training step, which on
    Colab is mostly a closed tab, so those count against a larger bound. An attempt that
    handed the job back on request (SIGTERM, runtime cap) is neither. `cherry retry` starts
    the count afresh."""
    crashes = setup_deaths = 0
    for i in range(len(history) - 1, -1, -1):
        attempt = history[i]
        if attempt.checkpoint_at_start != checkpoint or \
                (retried_after is not None and attempt.n <= retried_after):
            break
        end = history[i + 1].previous if i + 1 < len(history) else last_end
        if end is None:  # written by a version that did not record it: count it as before
            end = AttemptEnd(trained=True)
        if end.released and end.error is None:
            continue
        if end.trained or end.error is not None:
            crashes += 1
        else:
            setup_deaths += 1
    return crashes, setup_deaths


class JobQueue:
    def __init__(self, storage: Storage, clock=None):
        self.storage = storage
        self.clock = clock or SystemClock()
        # What an idle worker remembers between polls, so that a poll costs one listing of
        # queue/ (one request on Drive): manifests already read, and jobs that a live owner
        # holds, with when their lease could run out at the earliest. Both are keyed by the
        # manifest's listing entry, which changes when an owner releases its job.
        self._manifests: dict[str, tuple[tuple, Manifest]] = {}
        self._held: dict[str, tuple[tuple | None, datetime, int]] = {}

    # -- submit (client) -----------------------------------------------------------------------

    def submit(self, config: TrainingConfig, *, config_file: str = "", submitted_by: str = "",
               client_version: str = "") -> Manifest:
        if config.name is None:
            raise ValueError("the config needs a name before it is submitted")
        now = self.clock.now()
        while True:  # the 16-bit suffix collides only for jobs of one name in one second
            job_id = new_job_id(config.name, now)
            if not self._known(job_id):
                break
        manifest = Manifest(job_id=job_id, name=config.name, priority=config.priority,
                            submitted_at=now, submitted_by=submitted_by, config_file=config_file,
                            client_version=client_version, config=config,
                            reserved_ids=self._reserve(JobPaths(job_id)))
        # Temp name, then rename: a worker never sees half a manifest.
        self.storage.write_atomic(JobPaths(job_id).queued_manifest, manifest.to_json())
        return manifest

    def _reserve(self, paths: JobPaths) -> dict[str, str]:
        """Ids for the files whose creation must be exclusive or must not be duplicated, on
        backends that need them ({} elsewhere). Every worker reads them from the manifest, so
        the second create of, say, attempts/1.json is refused by the backend itself."""
        wanted = [paths.dir, paths.attempts_dir, paths.checkpoints_dir, paths.attempt(1),
                  paths.result, paths.cancel_request]
        ids = self.storage.reserve_ids(len(wanted))
        return dict(zip(wanted, ids, strict=True)) if ids else {}

    def _learn(self, manifest: Manifest | None) -> Manifest | None:
        """Tell the storage the ids this job's files are to be created with."""
        if manifest is not None and manifest.reserved_ids:
            self.storage.use_ids(manifest.reserved_ids)
        return manifest

    def request_cancel(self, job_id: str, requested_by: str = "") -> bool:
        """Ask for a job to be cancelled; False if it was asked before. The client only ever
        creates this new file: the worker that owns (or next meets) the job ends it."""
        record = json.dumps({"job_id": job_id, "requested_by": requested_by,
                             "at": self.clock.now().isoformat(),
                             "request": uuid.uuid4().hex}).encode()  # unique, as creates need
        self._learn(self._manifest(job_id))
        return self.storage.create_exclusive(JobPaths(job_id).cancel_request, record)

    def _known(self, job_id: str) -> bool:
        p = JobPaths(job_id)
        return any(self.storage.exists(x) for x in (p.queued_manifest, p.dir, p.failed_manifest))

    # -- what is waiting (worker) --------------------------------------------------------------

    def queued(self) -> tuple[list[Manifest], list[tuple[str, Exception]]]:
        """Manifests in queue/, in the order workers take them (priority, then submission),
        and the entries that cannot be read or validated, with why. Manifests are written once,
        so one read each is enough: later polls only list the folder."""
        good, bad = [], []
        entries = self.storage.list_entries(layout.QUEUE)
        for name in list(self._manifests):
            if name not in entries:
                del self._manifests[name]
        for name, info in sorted(entries.items()):
            if not name.endswith(".json"):
                continue
            job_id, key = name[: -len(".json")], (info.size, info.modified)
            cached = self._manifests.get(name)
            if cached is not None and cached[0] == key:
                good.append(cached[1])
                continue
            try:
                manifest = Manifest.from_json(self.storage.read_bytes(f"{layout.QUEUE}/{name}"))
            except FileNotFoundError:
                continue  # taken and moved by someone else since the listing
            except ValidationError as e:
                bad.append((job_id, ValueError(_concise(e))))
                continue
            except (ValueError, UnicodeDecodeError) as e:
                bad.append((job_id, e))
                continue
            if manifest.job_id != job_id:
                bad.append((job_id, ValueError(
                    f"manifest says job_id {manifest.job_id!r} but its file is {name!r}")))
                continue
            self._manifests[name] = (key, manifest)
            good.append(manifest)
        good.sort(key=lambda m: (-m.priority, m.submitted_at, m.job_id))
        return good, bad

    def _listing_key(self, job_id: str) -> tuple | None:
        cached = self._manifests.get(f"{job_id}.json")
        return cached[0] if cached else None

    def held_elsewhere(self, job_id: str, lease_seconds: float) -> bool:
        """Whether a live owner still holds the job, as far as we can tell cheaply: until its
        lease could run out, from memory; then from its heartbeat alone (one read). Forgotten
        once the manifest's listing entry changes (an owner that releases its job rewrites it)."""
        held = self._held.pop(job_id, None)
        if held is None or held[0] != self._listing_key(job_id):
            return False
        _, until, attempt = held
        if self.clock.now() >= until:
            hb = self.heartbeat(job_id)
            if hb is None or hb.attempt != attempt or hb.released:
                return False
            age = age_seconds(self.clock, hb.at)
            if age > lease_seconds:
                return False
            self._hold(job_id, attempt, lease_seconds - age)
            return True
        self._held[job_id] = held
        return True

    def _hold(self, job_id: str, attempt: int, seconds_left: float) -> None:
        """Remember that attempt `attempt` holds the job for at least `seconds_left` more."""
        until = self.clock.now() + timedelta(seconds=seconds_left)
        self._held[job_id] = (self._listing_key(job_id), until, attempt)

    def announce_release(self, job_id: str) -> None:
        """Rewrite the queued manifest (same bytes): its listing entry changes, so idle workers
        look at the released job at their next poll instead of when its lease would end."""
        path = JobPaths(job_id).queued_manifest
        try:
            self.storage.write_atomic(path, self.storage.read_bytes(path))
        except FileNotFoundError:
            pass

    def reject_manifest(self, job_id: str, error: Exception, worker_id: str) -> None:
        """Move an unusable manifest to failed/, with why beside it."""
        paths = JobPaths(job_id)
        record = FailedManifest(job_id=job_id, at=self.clock.now(), worker_id=worker_id,
                                error=error_info(error, with_traceback=False))
        # The error first: if we die between the two steps, the manifest is still in queue/
        # and the next worker repeats both. Nothing is lost either way.
        self.storage.write_atomic(paths.failed_error, record.to_json())
        try:
            self.storage.move(paths.queued_manifest, paths.failed_manifest)
        except FileNotFoundError:
            pass  # another worker rejected it first

    # -- claim -----------------------------------------------------------------------------

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

    def heartbeat(self, job_id: str) -> Heartbeat | None:
        try:
            return Heartbeat.from_json(self.storage.read_bytes(JobPaths(job_id).heartbeat))
        except (FileNotFoundError, ValidationError, ValueError):
            return None

    def footprint(self, job_id: str) -> tuple[int, int]:
        """Bytes a job's folder holds, and how many of them are checkpoints (two listings)."""
        paths = JobPaths(job_id)
        files = sum(i.size for i in self.storage.list_entries(paths.dir).values() if not i.is_dir)
        checkpoints = sum(i.size for i in self.storage.list_entries(paths.checkpoints_dir).values()
                          if not i.is_dir)
        return files + checkpoints, checkpoints

    def latest_checkpoint_step(self, job_id: str) -> int | None:
        """The newest checkpoint that was finished (has its checksum), by name only."""
        names = set(self.storage.list_dir(JobPaths(job_id).checkpoints_dir))
        steps = [s for n in names if (s := layout.checkpoint_step(n)) is not None
                 and f"{n}.sha256" in names]
        return max(steps, default=None)

    def try_claim(self, manifest: Manifest, me: WorkerIdentity) -> Claim | None:
        """Become the owner of this job, or return None if someone else holds it.

        Raises WorkerIdInUse if a live process with our worker id owns it."""
        job_id, config = manifest.job_id, manifest.config
        paths = JobPaths(job_id)
        if self.held_elsewhere(job_id, config.lease_seconds):
            return None
        self._learn(manifest)
        if self.storage.exists(paths.result):
            self.finish_bookkeeping(manifest)  # a crash came between commit and the move
            return None
        history = self.attempts(job_id)
        cancelled = self.cancel_requested(job_id)
        if cancelled and not history:
            self._commit_unclaimed(manifest, history, JobState.cancelled, me)
            return None
        reason, previous = AttemptReason.fresh, None
        if history:
            last = history[-1]
            hb = self.heartbeat(job_id)
            hb = hb if hb is not None and hb.attempt == last.n else None
            previous = _ending(hb)
            age = age_seconds(self.clock, hb.at if hb else last.started_at)
            if manifest.retried_after_attempt == last.n:
                reason = AttemptReason.retried  # its result was put aside: nobody holds it
            elif hb is not None and hb.released:
                reason = AttemptReason.after_error if hb.error else AttemptReason.released
            elif last.worker_id == me.worker_id and last.incarnation != me.incarnation:
                # The fast path after a Colab disconnect: our own id, a silent heartbeat. A
                # fresh heartbeat means another live process, unless that process is known
                # dead: same host, its pid gone (a double Ctrl-C, a killed notebook kernel).
                if age <= 2 * config.heartbeat_seconds and not gone_from_here(last.host, last.pid, me):
                    raise WorkerIdInUse(
                        f"worker id {me.worker_id!r} is already running job {job_id} "
                        f"(heartbeat {age:.0f} s ago, host {last.host or '?'}, pid {last.pid}). "
                        "Is a second notebook or tab running? Stop it, or give this worker "
                        "another --worker-id. If that process is gone, this clears once its "
                        f"heartbeat is {2 * config.heartbeat_seconds:g} s old.")
                reason = AttemptReason.same_worker
            elif last.worker_id == me.worker_id:
                reason = AttemptReason.same_worker  # our own process gave the job back earlier
            elif age > config.lease_seconds:
                reason = AttemptReason.lease_expired
            else:
                self._hold(job_id, last.n, config.lease_seconds - age)
                return None
        if cancelled:  # its owner is gone (or handed it back): nobody else will end it
            self._commit_unclaimed(manifest, history, JobState.cancelled, me)
            return None
        checkpoint = self.latest_checkpoint_step(job_id)
        crashes, setup_deaths = _attempts_without_progress(history, checkpoint, previous,
                                                           manifest.retried_after_attempt)
        if crashes >= config.max_attempts or \
                setup_deaths >= setup_death_bound(config.max_attempts):
            self._give_up(manifest, history, previous, crashes, setup_deaths, me)
            return None
        attempt = Attempt(n=history[-1].n + 1 if history else 1,
                          worker_id=me.worker_id, incarnation=me.incarnation, host=me.host,
                          pid=me.pid, started_at=self.clock.now(), reason=reason,
                          checkpoint_at_start=checkpoint, previous=previous,
                          next_id=next(iter(self.storage.reserve_ids(1)), None))
        if not self.storage.create_exclusive(paths.attempt(attempt.n), attempt.to_json()):
            return None  # another worker claimed it first
        journal("claim", job_id, attempt.n, worker_id=me.worker_id)
        faults.point("after-claim")
        return Claim(manifest=manifest, attempt=attempt, history=[*history, attempt])

    def _give_up(self, manifest: Manifest, history: list[Attempt], last_end: AttemptEnd,
                 crashes: int, setup_deaths: int, me: WorkerIdentity) -> None:
        max_attempts = manifest.config.max_attempts
        if crashes >= max_attempts:
            what = (f"{crashes} consecutive attempts ended without writing a checkpoint "
                    f"(max_attempts={max_attempts}); the job crashes its attempts, or the worker "
                    "process dies while training it (out of memory?)")
        else:
            what = (f"{setup_deaths} consecutive attempts died before their first training step "
                    f"(at most {setup_death_bound(max_attempts)}); the worker process probably "
                    "dies while setting this job up (copying its data, building its model)")
        ends = [a.previous for a in history[1:]] + [last_end]
        last_error = next((e.error for e in reversed(ends) if e is not None and e.error), None)
        error = ErrorInfo(
            type="CrashLoop",
            message=f"{what}. See attempts/ and worker.log"
                    + (f"; the last error: {last_error.type}: {last_error.message}"
                       if last_error else "")
                    + f". `cherry retry {manifest.job_id}` puts it back in the queue, to resume "
                    "from its newest checkpoint.",
            traceback=last_error.traceback if last_error else None)
        self._commit_unclaimed(manifest, history, JobState.failed, me, error)

    def _commit_unclaimed(self, manifest: Manifest, history: list[Attempt], state: JobState,
                          me: WorkerIdentity, error: ErrorInfo | None = None) -> None:
        """End a job nobody is running (cancelled while queued or stalled, crash loop).
        result.json is exclusive, so this needs no claim: whoever creates it first decides."""
        result = Result(job_id=manifest.job_id, state=state, attempts=len(history),
                        attempt_history=history, finished_at=self.clock.now(),
                        worker_id=me.worker_id, error=error)
        self.storage.create_exclusive(JobPaths(manifest.job_id).result, result.to_json())
        self.finish_bookkeeping(manifest)

    # -- retry (client) ------------------------------------------------------------------------

    def retry(self, job_id: str) -> Manifest:
        """Put a failed or cancelled job back in the queue: its next attempt resumes from the
        newest checkpoint, and the crash-loop count starts afresh. The result is put aside
        (done/<job>/results/<k>.json), not lost. Safe to repeat after an interruption: a job
        whose result went aside but whose manifest is not back in queue/ yet is completed."""
        paths = JobPaths(job_id)
        if self.storage.exists(paths.failed_manifest):
            raise NotRetryable(f"{job_id} was never claimed: its manifest is not valid (see "
                               f"{paths.failed_error}); fix the config and submit it again")
        raw = self.storage.read_text_or_none(paths.result)
        if raw is None:
            if self.storage.exists(paths.queued_manifest):
                raise NotRetryable(f"{job_id} is not finished; nothing to retry")
            manifest = self._manifest(job_id)  # a retry interrupted after the result went aside
            if manifest is None:
                raise NotRetryable(f"{job_id}: no such job")
        else:
            state = Result.from_json(raw).state
            if state not in (JobState.failed, JobState.cancelled):
                raise NotRetryable(f"{job_id} {state.value}; only a failed or cancelled job can "
                                   "be retried (submit the config again for a new run)")
            manifest = self._learn(self._manifest(job_id))
            if manifest is None:
                raise NotRetryable(f"{job_id}: its manifest cannot be read")
            earlier = self.storage.list_dir(f"{paths.dir}/results")
            self.storage.write_atomic(paths.earlier_result(len(earlier) + 1), raw.encode())
            self.storage.delete(paths.cancel_request)
            self.storage.delete(paths.result)
        history = self.attempts(job_id)
        update: dict = {"retried_after_attempt": history[-1].n if history else 0}
        # Backends that create exclusively through reserved ids (Drive API) need new ones for
        # the files made again: the next result and cancel request.
        ids = self.storage.reserve_ids(2)
        if ids and manifest.reserved_ids:
            update["reserved_ids"] = {**manifest.reserved_ids, paths.result: ids[0],
                                      paths.cancel_request: ids[1]}
        manifest = manifest.model_copy(update=update)
        self.storage.write_atomic(paths.queued_manifest, manifest.to_json())
        self.storage.delete(paths.done_manifest)
        self._learn(manifest)
        return manifest

    # -- while running -------------------------------------------------------------------------

    def fence(self, job_id: str, attempt: int) -> None:
        """Raise Fenced if an attempt later than ours exists."""
        for name in self.storage.list_dir(JobPaths(job_id).attempts_dir):
            stem = name.removesuffix(".json")
            if stem.isdigit() and int(stem) > attempt:
                raise Fenced(f"job {job_id}: attempt {stem} took over from attempt {attempt}")

    def owner(self, claim: Claim) -> Owner:
        from cherry_train.jobqueue.owner import Owner

        return Owner(self, claim)

    def cancel_requested(self, job_id: str) -> bool:
        return self.storage.exists(JobPaths(job_id).cancel_request)

    def finish_bookkeeping(self, manifest: Manifest, state: JobState | None = None) -> None:
        """After a result exists: checkpoints no longer needed go, then the manifest moves
        beside the result (either may have happened already: a crash came in between)."""
        paths = JobPaths(manifest.job_id)
        if state is None:
            raw = self.storage.read_text_or_none(paths.result)
            state = Result.from_json(raw).state if raw is not None else None
        if state is not None:
            self._tidy_checkpoints(manifest, state)
        try:
            self.storage.move(paths.queued_manifest, paths.done_manifest)
        except FileNotFoundError:
            pass

    def _tidy_checkpoints(self, manifest: Manifest, state: JobState) -> None:
        """A finished job's checkpoints only served resume: a succeeded job keeps
        `checkpoint.keep_after_finish` of them (0 by default: best.pt and final.pt hold its
        weights), a failed or cancelled one at least its newest, which `cherry retry` resumes
        from. Without this a ResNet-50 job leaves ~750 MB, and twenty fill a free Drive."""
        keep = manifest.config.checkpoint.keep_after_finish
        if state != JobState.succeeded:
            keep = max(1, keep)
        paths = JobPaths(manifest.job_id)
        steps = sorted(s for n in self.storage.list_dir(paths.checkpoints_dir)
                       if (s := layout.checkpoint_step(n)) is not None)
        for step in steps[:len(steps) - keep]:
            # The checksum first: a checkpoint without one is unfinished, never resumed from.
            self.storage.delete(paths.checkpoint_checksum(step))
            self.storage.delete(paths.checkpoint(step))

    # -- workers' own heartbeats ---------------------------------------------------------------

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

    # -- state, as `status` derives it ---------------------------------------------------------

    def queued_job_ids(self) -> set[str]:
        """Jobs whose manifest is in queue/: not finished (or put back by `cherry retry`)."""
        return {n[:-5] for n in self.storage.list_dir(layout.QUEUE) if n.endswith(".json")}

    def job_ids(self) -> list[str]:
        ids = self.queued_job_ids()
        ids.update(self.storage.list_dir(layout.DONE))
        ids.update(n[:-5] for n in self.storage.list_dir(layout.FAILED)
                   if n.endswith(".json") and not n.endswith(".error.json"))
        return sorted(ids, reverse=True)  # ids sort by submission time: newest first

    def view(self, job_id: str) -> JobView:
        """A job's state, in DESIGN.md §3's order: result > failed/ > cancel request on a queued
        job > attempt > queue/."""
        paths = JobPaths(job_id)
        manifest = self._learn(self._manifest(job_id))
        raw = self.storage.read_text_or_none(paths.result)
        if raw is not None:
            try:
                result = Result.from_json(raw)
                return JobView(job_id, result.state, manifest=manifest, result=result,
                               error=result.error.message if result.error else None)
            except (ValidationError, ValueError):
                pass  # being written without hard links: fall through to "running"
        if self.storage.exists(paths.failed_manifest):
            why = self.storage.read_text_or_none(paths.failed_error)
            try:
                message = FailedManifest.from_json(why).error.message if why else None
            except (ValidationError, ValueError):
                message = why
            return JobView(job_id, JobState.failed, error=message)
        history = self.attempts(job_id)
        cancel = self.cancel_requested(job_id)
        if cancel and not history:
            return JobView(job_id, JobState.cancelled, manifest=manifest, cancel_requested=True)
        if history and manifest is not None and manifest.retried_after_attempt == history[-1].n:
            return JobView(job_id, JobState.queued, manifest=manifest, attempt=history[-1])
        if history:
            hb = self.heartbeat(job_id)
            hb = hb if hb is not None and hb.attempt == history[-1].n else None
            seen = hb.at if hb is not None else history[-1].started_at
            age = age_seconds(self.clock, seen)
            lease = manifest.config.lease_seconds if manifest else 300.0
            return JobView(job_id, JobState.running, manifest=manifest, attempt=history[-1],
                           heartbeat=hb, heartbeat_age=age, cancel_requested=cancel,
                           stalled=age > lease and not (hb is not None and hb.released))
        return JobView(job_id, JobState.queued, manifest=manifest)

    def _manifest(self, job_id: str) -> Manifest | None:
        paths = JobPaths(job_id)
        for path in (paths.queued_manifest, paths.done_manifest):
            try:
                return Manifest.from_json(self.storage.read_bytes(path))
            except FileNotFoundError:
                continue
            except (ValidationError, ValueError):
                return None
        return None

