"""The worker: claim -> train -> commit, one job at a time, until told to stop.

`run()` owns signals, the stop flag, idle back-off and teardown; `run_once()` claims one job,
trains it and commits it. A job's failure is recorded in its result and never ends the loop."""

from __future__ import annotations

import shutil

import structlog

from cherry_train import __version__, logs
from cherry_train.backoff import STOPPING, Backoff, Stopped
from cherry_train.jobqueue.claims import Claim, WorkerIdentity
from cherry_train.jobqueue.clock import age_seconds
from cherry_train.jobqueue.lifecycle import (
    JobQueue,
    WorkerIdInUse,
    ending,
    ending_after_error,
    error_info,
)
from cherry_train.jobqueue.owner import Fenced, Owner
from cherry_train.jobqueue.sweeps import Sweeps
from cherry_train.schemas import JobState, Manifest, Phase, Result, WorkerState, WorkerStatus
from cherry_train.storage import is_outage
from cherry_train.worker import colabsession, results
from cherry_train.worker.checkpoints.kernelseal import forget_compiled_kernels
from cherry_train.worker.drain import DRAINED, Drain
from cherry_train.worker.errors import JobError, is_cuda_error
from cherry_train.worker.fit import Fit
from cherry_train.worker.identity import refuse_if_id_in_use
from cherry_train.worker.inputs.loaders import end_loader_processes, start_server_early
from cherry_train.worker.options import (
    EXIT_GPU_FAILED,
    IDLE_LINE_SECONDS,
    POLL_MAX_SECONDS,
    STATUS_IDLE_POLLS,
    STATUS_IDLE_SECONDS,
    SWEEP_CHECK_SECONDS,
    WorkerOptions,
)
from cherry_train.worker.outcome import JobRun, Runner
from cherry_train.worker.reporting.notify import (
    NOTIFY_AFTER_SIGNAL_SECONDS,
    NOTIFY_SECONDS,
    Notifier,
    handed_back_message,
    message_of,
)
from cherry_train.worker.reporting.reporter import Reporter
from cherry_train.worker.reporting.tensorboard import job_board
from cherry_train.worker.runners import runner_for
from cherry_train.worker.scratch import Scratch
from cherry_train.worker.signals import CutShort, StopRequest, stop_on_signals, write_on_the_way_out
from cherry_train.worker.space import SpaceGate
from cherry_train.worker.training import pruning
from cherry_train.worker.training.device import pick_device

log = structlog.get_logger(__name__)

class Worker:
    def __init__(self, queue: JobQueue, me: WorkerIdentity, options: WorkerOptions | None = None,
                 trainer: Runner | None = None, evaluator: Runner | None = None):
        self.queue, self.me = queue, me
        self.options = options or WorkerOptions()
        self.trainer, self.evaluator = trainer, evaluator  # unless given (a test's fake, seams)
        self.scratch = Scratch(self.options.scratch, queue.storage.description, me)
        self.stop = StopRequest()
        self.drain = Drain(queue, queue.poll, me.worker_id)  # `cherry drain`: finish, then exit
        self.fit = Fit(self.options.capabilities)  # a job's `requires:` against this device
        self.jobs_finished = self.jobs_handed_back = 0  # with a result / released unfinished
        self.exit_code, self.cap_reached = 0, False
        self.started_at = queue.clock.now()
        self._runtime_budget: colabsession.RuntimeBudget | None = None
        self._last_status: WorkerStatus | None = None
        self._idle_said_at: float | None = None  # idle seconds at the last "waiting for jobs"
        self._swept_at: float | None = None  # idle seconds at the last look at the sweeps
        self.sweeps = Sweeps(queue)
        self.promotions = pruning.Promotions(queue, self.options.poll_max_seconds)
        self.notifier = Notifier([self.options.webhook])
        self.space = SpaceGate(queue.storage)  # a job that cannot fit stays queued

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        """Work until stopped (signal) or, with exit_when_idle, until nothing is claimable."""
        log.info("worker started", worker_id=self.me.worker_id, incarnation=self.me.incarnation,
                 root=self.queue.storage.description, version=__version__)
        refuse_if_id_in_use(self.queue, self.me)  # two Colab tabs: the second stops
        self.scratch.clear_dead()
        start_server_early(pick_device())  # its imports overlap the first claim
        reason = "stopped"
        with stop_on_signals(self.stop, self._busy):
            try:
                reason = self._loop()
            except WorkerIdInUse:
                reason = "worker id in use"
                raise  # and leave the status file alone: it is the live worker's
            except KeyboardInterrupt as e:  # exit now: nothing more is written
                reason = "stop cut short" if isinstance(e, CutShort) else "second signal"
                raise
            finally:
                self.scratch.remove()
                end_loader_processes()
                if reason not in ("worker id in use", "second signal", "stop cut short"):
                    # The last job's message; briefly after a signal (inside the stop's bound).
                    self.notifier.flush(NOTIFY_AFTER_SIGNAL_SECONDS if STOPPING.is_set()
                                        else NOTIFY_SECONDS)
                    write_on_the_way_out("the final status", lambda: self._write_status(
                        WorkerState.stopped, interval=0))
                log.info("worker exiting", worker_id=self.me.worker_id, reason=reason,
                         jobs_finished=self.jobs_finished,
                         jobs_handed_back=self.jobs_handed_back)
        if reason == "idle shutdown" or ((self.cap_reached or reason == DRAINED) and
                                         self.options.idle_shutdown_minutes is not None):
            self.options.release_runtime()  # compute units stop burning
        return self.exit_code

    def _loop(self) -> str:
        """Claim and run jobs; between them poll, ever less often while idle. Why it ended."""
        clock, options = self.queue.clock, self.options
        polls = self._polls()
        wait, idle_since = next(polls), clock.now()
        while not self.stop.is_set():
            try:
                if self.run_once():
                    polls, idle_since, self._idle_said_at = self._polls(), clock.now(), None
                    self._swept_at = None
                    wait = next(polls)
                    continue
                ended = self._idle(age_seconds(clock, idle_since), wait)
                if ended is not None:
                    return ended
            except Stopped as e:  # what a wait cut short was for is dropped
                log.warning("stopping: gave up on what waited for the queue root", error=str(e))
                break
            except Exception as e:
                # A worker left running outlives a Drive outage (or a full Drive); a script
                # does not wait for one. A job caught in it resumes from its newest checkpoint,
                # as after a disconnect.
                if options.exit_when_idle or not is_outage(e):
                    raise
                log.error("the queue root cannot be reached; trying again",
                          error=logs.brief(e), retry_in_seconds=wait)
            clock.wait(self.stop, wait)
            wait = next(polls)
        return f"stop requested ({self.stop.reason})"

    def _polls(self):
        """Idle polling starts fast (a job submitted right after start is taken at once) and
        backs off to one poll every poll_max_seconds."""
        return Backoff(first=self.options.poll_min_seconds, cap=self.options.poll_max_seconds,
                       give_up_after=None).waits()

    def _idle(self, idle: float, wait: float) -> str | None:
        """Nothing was claimable: why the worker stops now, or None (it says it waits)."""
        if self.drain.seen:
            self._write_status(WorkerState.draining, interval=0)  # then stopped, on the way out
            self.drain.done()  # a later start under this id works on
            return DRAINED
        if self.cap_reached:
            return "runtime cap near: no job can reach a checkpoint before it"
        if self._swept_at is None or idle - self._swept_at >= SWEEP_CHECK_SECONDS:
            self._swept_at = idle
            if self._top_up():
                return None  # a sweep's next trials are queued: the next poll claims one
        if self.options.exit_when_idle:
            return "idle"
        minutes = self.options.idle_shutdown_minutes
        if minutes is not None and idle >= minutes * 60:
            return "idle shutdown"
        self._idle_status(wait)
        self._idle_line(idle, wait)
        return None

    def _budget(self) -> colabsession.RuntimeBudget | None:
        hours = self.options.max_runtime_hours
        if hours is None:
            return None
        if self._runtime_budget is None:  # once: the VM's uptime grows, its start does not
            started = colabsession.runtime_started_at(self.started_at)
            self._runtime_budget = colabsession.RuntimeBudget.from_hours(hours, started)
        return self._runtime_budget

    def run_once(self) -> bool:
        """Claim one job and see it through; False if there was nothing to do."""
        manifests, unreadable = self.queue.poll.queued()
        if self.drain.in_listing():
            return False  # drained: no claim, not even of a job it could finish
        for job_id, error in unreadable:
            log.warning("unreadable manifest moved to failed/", job_id=job_id, error=str(error))
            self.queue.reject_manifest(job_id, error, self.me.worker_id)
        budget, now = self._budget(), self.queue.clock.now()
        for manifest in manifests:
            if self.stop.is_set():
                return False  # a signal during the listing: no claim now, not even a quick one
            if not self.fit.can_run(manifest):
                continue  # before the claim: never an attempt here for a job it cannot run
            if budget is not None and not budget.can_start(manifest.config, now):
                if not self.cap_reached:
                    log.info("not starting a job that cannot reach a checkpoint before the "
                             "runtime cap", job_id=manifest.job_id,
                             minutes_left=round(budget.remaining(now).total_seconds() / 60, 1))
                self.cap_reached = True
                continue
            # A sweep trial paused at a rung is taken once promoted (or to be pruned); one
            # found not ready a moment ago costs no read. A job too large for the root's free
            # space is left queued, unclaimed (worker/space.py).
            if self.promotions.waiting(manifest.job_id) or self.space.refuses(manifest):
                continue
            claim = self.queue.try_claim(manifest, self.me, ready=self.promotions.ready)
            while self.queue.ended_unclaimed:  # ended here unclaimed: cancelled, crash loop
                self._tell(*self.queue.ended_unclaimed.pop(0))
            if claim is not None:
                self.execute(claim)
                self.promotions.forget()  # this job's epochs may have moved a rung's cut
                return True
        return bool(unreadable)

    # -- one job -----------------------------------------------------------------------------

    def execute(self, claim: Claim) -> None:
        # Every event logged while this job runs carries its id: it also lands in its worker.log.
        with structlog.contextvars.bound_contextvars(job_id=claim.job_id,
                                                     attempt=claim.attempt.n):
            self._execute(claim)

    def _execute(self, claim: Claim) -> None:
        owner = self.queue.owner(claim)
        interval = claim.manifest.config.heartbeat_seconds
        status = self._write_status(WorkerState.busy, claim.job_id, interval=interval)
        budget = self._budget()
        reporter = Reporter(owner, status, self.stop, interval, drain=self.drain,
                            board=job_board(claim, owner, self.scratch.for_job(claim.job_id)),
                            deadline=budget.stop_at() if budget is not None else None)
        log.info("job claimed", job_id=claim.job_id, attempt=claim.attempt.n,
                 reason=claim.attempt.reason.value, worker_id=self.me.worker_id, host=self.me.host)
        scratch = self.scratch.for_job(claim.job_id)
        shutil.rmtree(scratch, ignore_errors=True)  # a killed predecessor's half-written files
        try:
            reporter.start()
            owner.write(claim.paths.config, results.resolved_yaml(claim))
            run = JobRun(claim, reporter, self.stop, scratch, self.queue.storage.local_path(""),
                         self.options.progress_bar, self.options.gpus, self.options.kernel_seal)
            outcome = runner_for(claim, self.trainer, self.evaluator)(run)
            state = ending(outcome.completed, self.stop.reason, outcome.pruned is not None)
            if state is None:
                log.info("job released", job_id=claim.job_id, step=outcome.state.global_step,
                         reason=self.stop.reason or ("paused at a rung" if outcome.paused
                                                     else None))
                self._release(claim, owner, reporter, paused=outcome.paused is not None)
                if outcome.paused is not None:
                    self._top_up(claim.manifest.sweep.id)  # its worker is free for a new trial
                return
            result = results.result_of(claim, outcome, state, self.queue.clock.now())
        except Fenced as e:
            log.warning("job taken over; this attempt stops", job_id=claim.job_id, detail=str(e))
            return
        except Exception as e:
            state = ending_after_error(isinstance(e, JobError), self.stop.reason)
            if state is None:
                self._hand_back(claim, owner, reporter, e)
                return
            if state == JobState.cancelled:
                log.warning("job cancelled; an error came on the way", error=logs.brief(e))
            else:
                log.error("job failed", job_id=claim.job_id, error=str(e))
            result = results.failed_result(claim, e, self.queue.clock.now(),
                                           with_traceback=state == JobState.cancelled,
                                           state=state)
        finally:
            reporter.close()
            shutil.rmtree(scratch, ignore_errors=True)
            self.stop.clear_job_reasons()  # a cancel or a takeover ends the job, not the worker
        self._commit(claim, owner, reporter, result)

    def _commit(self, claim: Claim, owner: Owner, reporter: Reporter, result: Result) -> None:
        try:
            log.info("job finished", job_id=claim.job_id, state=result.state.value,
                     best=result.best.model_dump() if result.best else None)
            reporter.beat(phase=Phase.finished)
            reporter.finish()
            forget_compiled_kernels(owner)
            result.artifacts = results.artifacts(owner)
            won = self.queue.commit(owner, result)
        except Fenced:
            log.warning("job taken over before commit; result discarded", job_id=claim.job_id)
            return
        if not won:
            log.warning("another attempt committed first; this result was discarded",
                        job_id=claim.job_id)
        else:
            self.jobs_finished += 1
            self._tell(claim.manifest, result)
        if claim.manifest.sweep is not None:
            self._top_up(claim.manifest.sweep.id)  # the sweep's next trial, for whoever is free

    def _top_up(self, sweep_id: str | None = None) -> int:
        """Create a sweep's next trials (after one of its trials ended), or, idle, those of
        every sweep short of trials in flight (a sweep whose worker died before topping it up
        goes on). How many were queued; never the worker's end."""
        try:
            if sweep_id is not None:
                return len(self.sweeps.top_up(sweep_id, by=self.me.worker_id))
            return self.sweeps.top_up_all(by=self.me.worker_id)
        except Exception as e:
            log.warning("could not create a sweep's next trials; another worker will",
                        sweep_id=sweep_id, error=logs.brief(e))
            return 0

    def _release(self, claim: Claim, owner: Owner, reporter: Reporter,
                 error: Exception | None = None, paused: bool = False) -> None:
        reporter.close()
        try:
            reporter.sync_metrics()
            self.queue.release(owner, reporter.heartbeat(
                phase=Phase.paused if paused else Phase.released, released=True,
                error=error_info(error, with_traceback=True) if error is not None else None))
            reporter.finish()
            self.jobs_handed_back += 1
        except Fenced:
            log.warning("job taken over meanwhile; nothing more written", job_id=claim.job_id)

    def _hand_back(self, claim: Claim, owner: Owner, reporter: Reporter,
                   error: Exception) -> None:
        """End the attempt without ending the job: it is not the job's fault
        (docs/contract.md §8). The heartbeat says why; the next attempt (this worker's next
        poll, or another worker's) resumes from the newest checkpoint and records the error in
        its history."""
        stopping = self.stop.is_set()  # the error most likely came of the stop itself
        if stopping:
            log.warning("error while stopping; the job is handed back", job_id=claim.job_id,
                        reason=self.stop.reason, error=logs.brief(error))
        else:
            log.error("attempt ended by an error that is not the job's; the job is handed back "
                      "and resumes from its newest checkpoint", job_id=claim.job_id,
                      error=logs.brief(error), exc_info=error)
        if is_cuda_error(error):
            # Every later CUDA call of this process fails too: hand back, then exit.
            self.stop.set("cuda-error")
            self.exit_code = EXIT_GPU_FAILED
            log.error("the GPU's CUDA context is unusable after this error: the worker exits. "
                      "Start it again (on Colab: Runtime > Restart session, then run the worker "
                      "cell); the job resumes from its newest checkpoint",
                      error=logs.brief(error))
        self._release(claim, owner, reporter, None if stopping else error)
        if not stopping:
            self.notifier.send(*handed_back_message(claim.job_id, claim.manifest.config.name,
                                                    self.me.worker_id, error),
                               extra=claim.manifest.config.notify.webhook)

    def _tell(self, manifest: Manifest, result: Result) -> None:
        """A job's end to the webhooks (the worker's and the job's): sent in the background."""
        self.notifier.send(*message_of(result, manifest.config.name, self.me.worker_id),
                           extra=manifest.config.notify.webhook)

    # -- identity and status -----------------------------------------------------------------

    def _idle_line(self, idle: float, wait: float) -> None:
        """Say that the worker waits, at once and then every IDLE_LINE_SECONDS: a worker left
        running in a notebook is otherwise silent, and silence looks like a hang."""
        if self._idle_said_at is not None and idle - self._idle_said_at < IDLE_LINE_SECONDS:
            return
        self._idle_said_at = idle
        log.info("waiting for jobs", root=self.queue.storage.description,
                 idle_minutes=round(idle / 60, 1), next_poll_seconds=round(wait, 1),
                 polls_back_off_to=self.options.poll_max_seconds,
                 hint="submit one with `cherry submit CONFIG.yaml`")

    def _idle_status(self, wait: float) -> None:
        """Announce "idle" when it is news, else once every STATUS_IDLE_POLLS longest polls or
        STATUS_IDLE_SECONDS, the longer. The interval announced is one poll longer than that,
        since the refresh comes at the first poll after it is due; a restarted worker with our
        id waits out 2x the announced interval to tell us from a ghost."""
        every = max(STATUS_IDLE_SECONDS, STATUS_IDLE_POLLS * self.options.poll_max_seconds)
        last = self._last_status
        # Half a wait of slack: polls come a little later than their wait, never earlier.
        if last is not None and last.state == WorkerState.idle and \
                age_seconds(self.queue.clock, last.at) + wait / 2 < every:
            return
        self._write_status(WorkerState.idle, interval=every + self.options.poll_max_seconds)

    def _busy(self) -> bool:
        return self._last_status is not None and self._last_status.state == WorkerState.busy

    def _write_status(self, state: WorkerState, job_id: str | None = None,
                      interval: float = POLL_MAX_SECONDS) -> WorkerStatus:
        status = WorkerStatus(worker_id=self.me.worker_id, incarnation=self.me.incarnation,
                              at=self.queue.clock.now(), state=state, interval_seconds=interval,
                              host=self.me.host, pid=self.me.pid, job_id=job_id,
                              version=__version__, capabilities=self.options.capabilities)
        try:
            self.queue.write_worker_status(status)
            self._last_status = status
        except OSError as e:  # status is informational: never fail on it
            log.warning("could not write worker status", error=str(e))
        return status
