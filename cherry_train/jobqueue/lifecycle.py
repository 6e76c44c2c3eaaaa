"""The job lifecycle of docs/contract.md §3: every state transition, in the order a job meets them.

    submit ──> queued ──claim──> running ──commit──> succeeded | failed | cancelled | pruned
                 ^  │  (takeover)   │ ──release / pause──> queued (the next claim resumes it)
                 │  └─cancel / unreadable / crash loop──> cancelled | failed
                 └──────────── retry (a failed or cancelled job) ────────────┘

A claim is the exclusive creation of `attempts/<n>.json`; a commit, of `result.json`. The rest
(moving the manifest, tidying, heartbeats) is bookkeeping the next worker completes if a crash
interrupts it. Who moves a job: the client submits, cancels (a request file) and retries; a
worker claims, takes over, releases and commits (`worker/loop.py` decides which, with `ending`
below), and ends jobs nobody runs (a cancel request, a crash loop) at its next claim. Reading
the files is jobfiles.py; what `status` makes of them, views.py; the idle poll, polling.py.
"""

from __future__ import annotations

import contextlib
import json
import traceback
import uuid
from collections.abc import Callable

from cherry_train import faults
from cherry_train.jobqueue import layout
from cherry_train.jobqueue.claims import Claim, WorkerIdentity, gone_from_here
from cherry_train.jobqueue.clock import age_seconds
from cherry_train.jobqueue.ids import new_job_id
from cherry_train.jobqueue.jobfiles import JobFiles
from cherry_train.jobqueue.layout import JobPaths
from cherry_train.jobqueue.owner import Owner, journal
from cherry_train.jobqueue.polling import Poll
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
)
from cherry_train.schemas.sweep import SweepRef


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


def error_info(exc: BaseException, with_traceback: bool = True) -> ErrorInfo:
    tb = "".join(traceback.format_exception(exc)) if with_traceback else None
    return ErrorInfo(type=type(exc).__name__, message=str(exc) or type(exc).__name__, traceback=tb)


def ending(completed: bool, stop_reason: str | None, pruned: bool = False) -> JobState | None:
    """How an attempt that returned ends its job: finished, stopped early (a sweep trial behind
    its siblings), cancelled on request, or (None) released, to be resumed by the next claim (a
    signal, the runtime cap)."""
    if completed:
        return JobState.succeeded
    if pruned:
        return JobState.pruned
    return JobState.cancelled if stop_reason == "cancel" else None


def ending_after_error(is_job_error: bool, stop_reason: str | None) -> JobState | None:
    """How an attempt that raised ends its job: cancelled if that was asked for (an error on the
    way changes nothing), failed if the error is the job's (its config, its data), else (None)
    released: not the job's fault (docs/contract.md §8), the next attempt resumes it."""
    if stop_reason == "cancel":
        return JobState.cancelled
    return JobState.failed if is_job_error and stop_reason is None else None


class JobQueue(JobFiles):
    def __init__(self, storage, clock=None):
        super().__init__(storage, clock)
        self.poll = Poll(self)
        self.ended_unclaimed: list[tuple[Manifest, Result]] = []  # for the worker's webhook

    def owner(self, claim: Claim) -> Owner:
        return Owner(self, claim)

    # -- submit (client): nothing -> queued ----------------------------------------------------

    def submit(self, config: TrainingConfig, *, config_file: str = "", submitted_by: str = "",
               client_version: str = "", job_id: str | None = None,
               sweep: SweepRef | None = None) -> Manifest:
        """Queue a job; `job_id` when it was chosen already (a sweep's trial record names it)."""
        if config.name is None:
            raise ValueError("the config needs a name before it is submitted")
        now = self.clock.now()
        while job_id is None:  # the 16-bit suffix collides only for jobs of one name in 1 s
            job_id = new_job_id(config.name, now)
            if self.known(job_id):
                job_id = None
        manifest = Manifest(job_id=job_id, name=config.name, priority=config.priority,
                            submitted_at=now, submitted_by=submitted_by, config_file=config_file,
                            client_version=client_version, config=config, sweep=sweep,
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

    # -- cancel (client): a request; the owner, or the next claim, ends the job ----------------

    def request_cancel(self, job_id: str, requested_by: str = "") -> bool:
        """Ask for a job to be cancelled; False if it was asked before. The client only ever
        creates this new file: the worker that owns (or next meets) the job ends it."""
        record = json.dumps({"job_id": job_id, "requested_by": requested_by,
                             "at": self.clock.now().isoformat(),
                             "request": uuid.uuid4().hex}).encode()  # unique, as creates need
        self.learn(self.manifest(job_id))
        return self.storage.create_exclusive(JobPaths(job_id).cancel_request, record)

    # -- queued -> failed/: a manifest nobody can read -----------------------------------------

    def reject_manifest(self, job_id: str, error: Exception, worker_id: str) -> None:
        """Move an unusable manifest to failed/, with why beside it."""
        paths = JobPaths(job_id)
        record = FailedManifest(job_id=job_id, at=self.clock.now(), worker_id=worker_id,
                                error=error_info(error, with_traceback=False))
        # The error first: if we die between the two steps, the manifest is still in queue/
        # and the next worker repeats both. Nothing is lost either way.
        self.storage.write_atomic(paths.failed_error, record.to_json())
        with contextlib.suppress(FileNotFoundError):  # another worker rejected it first
            self.storage.move(paths.queued_manifest, paths.failed_manifest)

    # -- queued -> running: claim, or take over from a silent owner ----------------------------

    def try_claim(self, manifest: Manifest, me: WorkerIdentity,
                  ready: Callable[[Manifest, AttemptEnd], bool] | None = None) -> Claim | None:
        """Become the owner of this job, or return None if someone else holds it, if it ended
        here (a cancel nobody else will act on, a crash loop), or if `ready` says its release
        asks it to wait (a sweep trial paused at a rung, not promoted yet).

        Raises WorkerIdInUse if a live process with our worker id owns it."""
        job_id, config, paths = manifest.job_id, manifest.config, JobPaths(manifest.job_id)
        if self.poll.held_elsewhere(job_id, config.lease_seconds):
            return None
        self.learn(manifest)
        if self.storage.exists(paths.result):
            self.finish_bookkeeping(manifest)  # a crash came between commit and the move
            return None
        history = self.attempts(job_id)
        cancelled = self.cancel_requested(job_id)
        reason, previous = AttemptReason.fresh, None
        if history:
            previous, reason = self._takeover(manifest, history[-1], me)
            if reason is None:
                return None
        if cancelled:  # its owner is gone (or handed it back): nobody else will end it
            self._commit_unclaimed(manifest, history, JobState.cancelled, me)
            return None
        if previous is not None and ready is not None and not ready(manifest, previous):
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

    def _takeover(self, manifest: Manifest, last: Attempt,
                  me: WorkerIdentity) -> tuple[AttemptEnd, AttemptReason | None]:
        """How the last attempt ended (from its last heartbeat) and why we may start the next
        one; None while its owner still holds the job."""
        config = manifest.config
        hb = self.heartbeat(manifest.job_id)
        hb = hb if hb is not None and hb.attempt == last.n else None
        previous = _ending(hb)
        age = age_seconds(self.clock, hb.at if hb else last.started_at)
        if manifest.retried_after_attempt == last.n:
            return previous, AttemptReason.retried  # its result was put aside: nobody holds it
        if hb is not None and hb.released:
            return previous, AttemptReason.after_error if hb.error else AttemptReason.released
        if last.worker_id == me.worker_id and last.incarnation != me.incarnation:
            # The fast path after a Colab disconnect: our own id, a silent heartbeat. A fresh
            # heartbeat means another live process, unless that process is known dead: same
            # host, its pid gone (a double Ctrl-C, a killed notebook kernel).
            if age <= 2 * config.heartbeat_seconds and not gone_from_here(last.host, last.pid, me):
                raise WorkerIdInUse(
                    f"worker id {me.worker_id!r} is already running job {manifest.job_id} "
                    f"(heartbeat {age:.0f} s ago, host {last.host or '?'}, pid {last.pid}). "
                    "Is a second notebook or tab running? Stop it, or give this worker "
                    "another --worker-id. If that process is gone, this clears once its "
                    f"heartbeat is {2 * config.heartbeat_seconds:g} s old.")
            return previous, AttemptReason.same_worker
        if last.worker_id == me.worker_id:
            return previous, AttemptReason.same_worker  # our own process gave it back earlier
        if age > config.lease_seconds:
            return previous, AttemptReason.lease_expired
        self.poll.hold(manifest.job_id, last.n, config.lease_seconds - age)
        return previous, None

    # -- queued -> failed: a crash loop; queued -> cancelled: nobody runs it -------------------

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
        error = ErrorInfo(type="CrashLoop", message=f"{what}. See attempts/ and worker.log"
                          + (f"; the last error: {last_error.type}: {last_error.message}"
                             if last_error else "")
                          + f". `cherry retry {manifest.job_id}` puts it back in the queue, to "
                          "resume from its newest checkpoint.",
                          traceback=last_error.traceback if last_error else None)
        self._commit_unclaimed(manifest, history, JobState.failed, me, error)

    def _commit_unclaimed(self, manifest: Manifest, history: list[Attempt], state: JobState,
                          me: WorkerIdentity, error: ErrorInfo | None = None) -> None:
        """End a job nobody is running (cancelled while queued or stalled, crash loop).
        result.json is exclusive, so this needs no claim: whoever creates it first decides."""
        result = Result(job_id=manifest.job_id, state=state, attempts=len(history),
                        attempt_history=history, finished_at=self.clock.now(),
                        worker_id=me.worker_id, error=error)
        if self.storage.create_exclusive(JobPaths(manifest.job_id).result, result.to_json()):
            self.ended_unclaimed.append((manifest, result))
        self.finish_bookkeeping(manifest)

    # -- running -> queued: the owner hands the job back ---------------------------------------

    def release(self, owner: Owner, last_heartbeat: Heartbeat) -> None:
        """The owner's last heartbeat says released (and, after an error, which one: the next
        attempt records it). Then the queued manifest is rewritten, same bytes: its listing
        entry changes, so idle workers look at the job at their next poll instead of when its
        lease would end."""
        paths = owner.claim.paths
        owner.write(paths.heartbeat, last_heartbeat.to_json())
        with contextlib.suppress(FileNotFoundError):
            self.storage.write_atomic(paths.queued_manifest,
                                      self.storage.read_bytes(paths.queued_manifest))

    # -- running -> succeeded | failed | cancelled ---------------------------------------------

    def commit(self, owner: Owner, result: Result) -> bool:
        """Create result.json exclusively (fenced); True if ours is the result. Then tidy up."""
        won = owner.create_result(result)
        self.finish_bookkeeping(owner.claim.manifest, result.state if won else None)
        return won

    def finish_bookkeeping(self, manifest: Manifest, state: JobState | None = None) -> None:
        """After a result exists: checkpoints no longer needed go, and the temp files of writers
        killed mid-write (every writer has ended or is fenced), then the manifest moves beside
        the result (any of these may have happened already: a crash came in between)."""
        paths = JobPaths(manifest.job_id)
        if state is None:
            raw = self.storage.read_text_or_none(paths.result)
            state = Result.from_json(raw).state if raw is not None else None
        if state is not None:
            self._tidy_checkpoints(manifest, state)
            self.storage.remove_temps(paths.dir)
        with contextlib.suppress(FileNotFoundError):
            self.storage.move(paths.queued_manifest, paths.done_manifest)

    def _tidy_checkpoints(self, manifest: Manifest, state: JobState) -> None:
        """A finished job's checkpoints only served resume: a succeeded job keeps
        `checkpoint.keep_after_finish` of them (0 by default: best.pt and final.pt hold its
        weights), a failed or cancelled one at least its newest, which `cherry retry` resumes
        from. Without this a ResNet-50 job leaves ~750 MB, and twenty fill a free Drive."""
        keep = manifest.config.checkpoint.keep_after_finish
        if state not in (JobState.succeeded, JobState.pruned):
            keep = max(1, keep)
        paths = JobPaths(manifest.job_id)
        steps = sorted(s for n in self.storage.list_dir(paths.checkpoints_dir)
                       if (s := layout.checkpoint_step(n)) is not None)
        for step in steps[:len(steps) - keep]:
            # The checksum first: a checkpoint without one is unfinished, never resumed from.
            self.storage.delete(paths.checkpoint_checksum(step))
            self.storage.delete(paths.checkpoint(step))

    # -- failed | cancelled -> queued: retry (client) ------------------------------------------

    def retry(self, job_id: str) -> Manifest:
        """Put a failed or cancelled job back in the queue: its next attempt resumes from the
        newest checkpoint, and the crash-loop count starts afresh. The result is put aside
        (done/<job>/results/<k>.json), not lost (a job cancelled before it started has none).
        Repeating it after an interruption completes it."""
        paths = JobPaths(job_id)
        manifest = self._retryable(job_id)
        self.storage.delete(paths.cancel_request)  # first: else the next claim cancels it
        raw = self.storage.read_text_or_none(paths.result)  # none: cancelled before it started
        if raw is not None:
            earlier = self.storage.list_dir(f"{paths.dir}/results")
            self.storage.write_atomic(paths.earlier_result(len(earlier) + 1), raw.encode())
            self.storage.delete(paths.result)
        history = self.attempts(job_id)
        update: dict = {"retried_after_attempt": history[-1].n if history else 0}
        # Drive API roots create exclusively through reserved ids: new ones for files made again.
        ids = self.storage.reserve_ids(2)
        if ids and manifest.reserved_ids:
            update["reserved_ids"] = {**manifest.reserved_ids, paths.result: ids[0],
                                      paths.cancel_request: ids[1]}
        manifest = manifest.model_copy(update=update)
        self.storage.write_atomic(paths.queued_manifest, manifest.to_json())
        self.storage.delete(paths.done_manifest)
        self.learn(manifest)
        return manifest

    def _retryable(self, job_id: str) -> Manifest:
        """The manifest of a job `retry` may put back; NotRetryable, saying why, otherwise."""
        paths = JobPaths(job_id)
        if self.storage.exists(paths.failed_manifest):
            raise NotRetryable(f"{job_id} was never claimed: its manifest is not valid (see "
                               f"{paths.failed_error}); fix the config and submit it again")
        raw = self.storage.read_text_or_none(paths.result)
        if raw is None:
            manifest = self.manifest(job_id)  # or a retry interrupted after the result went aside
            if self.storage.exists(paths.queued_manifest) and \
                    not self.cancelled_before_start(job_id, manifest):
                raise NotRetryable(f"{job_id} is not finished; nothing to retry")
            if manifest is None:
                raise NotRetryable(f"{job_id}: no such job")
            return manifest
        state = Result.from_json(raw).state
        if not state.retryable:
            raise NotRetryable(f"{job_id} {state.value}; only a failed or cancelled job can "
                               "be retried (submit the config again for a new run)")
        manifest = self.learn(self.manifest(job_id))
        if manifest is None:
            raise NotRetryable(f"{job_id}: its manifest cannot be read")
        return manifest


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
