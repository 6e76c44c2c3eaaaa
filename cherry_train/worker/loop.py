"""The worker: claim -> train -> commit, one job at a time, until told to stop.

`run()` owns signals, the stop flag, idle back-off and teardown; `run_once()` claims one job,
trains it and commits it. A job's failure is recorded in its result and never ends the loop.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import structlog
import yaml

from cherry_train import __version__, logs
from cherry_train.jobqueue.clock import age_seconds
from cherry_train.jobqueue.owner import Fenced
from cherry_train.jobqueue.protocol import (
    Claim,
    JobQueue,
    WorkerIdentity,
    WorkerIdInUse,
    error_info,
    gone_from_here,
)
from cherry_train.schemas import Artifact, BestEpoch, JobState, Mode, Result, WorkerStatus
from cherry_train.storage import is_outage
from cherry_train.worker import runtime
from cherry_train.worker.errors import JobError, is_cuda_error
from cherry_train.worker.reporting import Reporter, StopRequest

log = structlog.get_logger(__name__)

#: Idle polling starts fast (a job submitted right after start is taken at once) and backs off
#: to a poll every 30 s, which costs an idle Drive folder almost nothing.
POLL_MIN_SECONDS = 1.0
POLL_MAX_SECONDS = 30.0
#: An idle worker refreshes its status file every this many longest poll waits (a minute by
#: default), not at every poll: on a Drive API root a poll is then one request (the listing of
#: queue/), and the status one more a minute.
STATUS_IDLE_POLLS = 2
#: An idle worker says it waits at once, then every this many seconds.
IDLE_LINE_SECONDS = 300.0
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
    release_runtime: Callable[[], None] = runtime.release_runtime


class Worker:
    def __init__(self, queue: JobQueue, me: WorkerIdentity, options: WorkerOptions | None = None,
                 trainer: Callable | None = None):
        self.queue, self.me = queue, me
        self.options = options or WorkerOptions()
        # The seam for queue tests: anything with train.train's signature and Outcome result.
        self.trainer = trainer
        self.stop = StopRequest()
        self.jobs_done = 0
        self.exit_code = 0
        self.cap_reached = False
        self.started_at = queue.clock.now()
        self._runtime_budget: runtime.RuntimeBudget | None = None
        self._last_status: WorkerStatus | None = None
        self._idle_said_at: float | None = None  # idle seconds at the last "waiting for jobs"

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        """Work until stopped (signal) or, with exit_when_idle, until nothing is claimable."""
        log.info("worker started", worker_id=self.me.worker_id, incarnation=self.me.incarnation,
                 root=self.queue.storage.description, version=__version__)
        self.refuse_if_id_in_use()
        self._clear_dead_scratch()
        clock, options = self.queue.clock, self.options
        wait = options.poll_min_seconds
        reason = "stopped"
        idle_since = clock.now()
        with self._signals():
            try:
                while not self.stop.is_set():
                    try:
                        if self.run_once():
                            wait, idle_since = options.poll_min_seconds, clock.now()
                            self._idle_said_at = None
                            continue
                        if self.cap_reached:
                            reason = "runtime cap near: no job can reach a checkpoint before it"
                            break
                        if options.exit_when_idle:
                            reason = "idle"
                            break
                        idle = age_seconds(clock, idle_since)
                        if options.idle_shutdown_minutes is not None and \
                                idle >= options.idle_shutdown_minutes * 60:
                            reason = "idle shutdown"
                            break
                        self._idle_status(wait)
                        self._idle_line(idle, wait)
                    except Exception as e:
                        # A worker left running outlives a Drive outage (or a full Drive); a
                        # script does not wait for one. A job caught in it resumes from its
                        # newest checkpoint, as after a disconnect.
                        if options.exit_when_idle or not is_outage(e):
                            raise
                        log.error("the queue root cannot be reached; trying again",
                                  error=logs.brief(e),
                                  retry_in_seconds=wait)
                    clock.wait(self.stop, wait)
                    wait = min(wait * 2, options.poll_max_seconds)
                else:
                    reason = f"stop requested ({self.stop.reason})"
            except WorkerIdInUse:
                reason = "worker id in use"
                raise  # and leave the status file alone: it is the live worker's
            finally:
                self._remove_scratch()
                _end_helper_processes()
                if reason != "worker id in use":
                    self._write_final_status()
                log.info("worker exiting", worker_id=self.me.worker_id, reason=reason,
                         jobs_done=self.jobs_done)
        if reason == "idle shutdown" or (self.cap_reached and
                                         options.idle_shutdown_minutes is not None):
            options.release_runtime()  # compute units stop burning
        return self.exit_code

    def _budget(self) -> runtime.RuntimeBudget | None:
        hours = self.options.max_runtime_hours
        if hours is None:
            return None
        if self._runtime_budget is None:  # once: the VM's uptime grows, its start does not
            started = runtime.runtime_started_at(self.started_at)
            self._runtime_budget = runtime.RuntimeBudget.from_hours(hours, started)
        return self._runtime_budget

    def run_once(self) -> bool:
        """Claim one job and see it through; False if there was nothing to do."""
        manifests, unreadable = self.queue.queued()
        for job_id, error in unreadable:
            log.warning("unreadable manifest moved to failed/", job_id=job_id, error=str(error))
            self.queue.reject_manifest(job_id, error, self.me.worker_id)
        budget, now = self._budget(), self.queue.clock.now()
        for manifest in manifests:
            if budget is not None and not budget.can_start(manifest.config, now):
                if not self.cap_reached:
                    log.info("not starting a job that cannot reach a checkpoint before the "
                             "runtime cap", job_id=manifest.job_id,
                             minutes_left=round(budget.remaining(now).total_seconds() / 60, 1))
                self.cap_reached = True
                continue
            claim = self.queue.try_claim(manifest, self.me)
            if claim is not None:
                self.execute(claim)
                self.jobs_done += 1
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
        status = self._write_status("busy", claim.job_id,
                                    interval=claim.manifest.config.heartbeat_seconds)
        budget = self._budget()
        reporter = Reporter(owner, status, self.stop,
                            deadline=budget.stop_at() if budget is not None else None)
        log.info("job claimed", job_id=claim.job_id, attempt=claim.attempt.n,
                 reason=claim.attempt.reason.value, worker_id=self.me.worker_id, host=self.me.host)
        scratch = self._scratch(claim)
        shutil.rmtree(scratch, ignore_errors=True)  # a killed predecessor's half-written files
        result: Result | None = None
        try:
            reporter.start()
            owner.write(claim.paths.config, _resolved_yaml(claim))
            outcome = self._runner(claim)(claim, reporter, self.stop, scratch,
                                          self.queue.storage.local_path(""),
                                          self.options.progress_bar)
            if outcome.completed:
                result = _result(claim, outcome, JobState.succeeded, self.queue.clock.now())
            elif self.stop.reason == "cancel":
                result = _result(claim, outcome, JobState.cancelled, self.queue.clock.now())
            else:
                reporter.close()
                log.info("job released", job_id=claim.job_id, reason=self.stop.reason,
                         step=outcome.state.global_step)
                reporter.beat(phase="released", released=True)
                self.queue.announce_release(claim.job_id)
                reporter.finish()
                return
        except Fenced as e:
            log.warning("job taken over; this attempt stops", job_id=claim.job_id, detail=str(e))
            return
        except Exception as e:
            now = self.queue.clock.now()
            if self.stop.reason == "cancel":  # asked to end it: an error on the way changes nothing
                log.warning("job cancelled; an error came on the way", error=logs.brief(e))
                result = _failed(claim, e, now, with_traceback=True, state=JobState.cancelled)
            elif isinstance(e, JobError) and not self.stop.is_set():
                log.error("job failed", job_id=claim.job_id, error=str(e))
                result = _failed(claim, e, now, with_traceback=False)
            else:
                self._hand_back(claim, reporter, e)
                return
        finally:
            reporter.close()
            shutil.rmtree(scratch, ignore_errors=True)
            self.stop.clear_job_reasons()  # a cancel or a takeover ends the job, not the worker
        try:
            log.info("job finished", job_id=claim.job_id, state=result.state.value,
                     best=result.best.model_dump() if result.best else None)
            reporter.beat(phase="finished")
            reporter.finish()
            _forget_compiled_kernels(owner)
            result.artifacts = _artifacts(owner)
            won = owner.commit(result)
        except Fenced:
            log.warning("job taken over before commit; result discarded", job_id=claim.job_id)
            return
        if not won:
            log.warning("another attempt committed first; this result was discarded",
                        job_id=claim.job_id)

    def _hand_back(self, claim: Claim, reporter: Reporter, error: Exception) -> None:
        """End the attempt without ending the job: it is not the job's fault (DESIGN.md §9). The
        heartbeat says why; the next attempt (this worker's next poll, or another worker's)
        resumes from the newest checkpoint and records the error in its history."""
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
        reporter.close()
        try:
            reporter.beat(phase="released", released=True,
                          error=None if stopping else error_info(error, with_traceback=True))
            self.queue.announce_release(claim.job_id)
            reporter.finish()
        except Fenced:
            log.warning("job taken over meanwhile; nothing more written", job_id=claim.job_id)

    def _runner(self, claim: Claim) -> Callable:
        """What runs the job: the evaluator in mode: evaluation, else the trainer."""
        if claim.manifest.config.mode == Mode.evaluation:
            from cherry_train.worker.evaluate import evaluate  # torch is imported only for work

            return evaluate
        if self.trainer is None:
            from cherry_train.worker.train import train

            self.trainer = train
        return self.trainer

    def _scratch_base(self) -> Path:
        """This worker id's scratch on this root: <scratch>/<worker id>-<hash of root and id>.
        A worker with the same id on another root (the default id is the host name) has its
        own, and never touches this one."""
        base = self.options.scratch or Path(tempfile.gettempdir()) / "cherry-train-scratch"
        key = hashlib.sha256(f"{self.queue.storage.description}\n{self.me.worker_id}".encode())
        return base / f"{self.me.worker_id}-{key.hexdigest()[:12]}"

    def _scratch(self, claim: Claim | None = None) -> Path:
        # Local disk, never the queue root: torch.save must not write through a flaky mount.
        # Publishing is then one copy (or a rename, on the same file system), and retryable.
        # One folder per process (pid, incarnation): what it left is known to be dead's once
        # that pid is gone.
        mine = self._scratch_base() / f"{self.me.pid}-{self.me.incarnation}"
        return mine / claim.job_id if claim is not None else mine

    def _clear_dead_scratch(self) -> None:
        """Remove what dead incarnations of this worker on this root left in scratch (a
        checkpoint being written when SIGKILL came: hundreds of MB each on a ResNet-50): the
        folders of processes no longer alive on this host."""
        base = self._scratch_base()
        dead = [p for p in base.iterdir() if not _alive(p.name)] if base.is_dir() else []
        if dead:
            log.info("removing a killed worker's scratch files", path=str(base),
                     jobs=sorted(j.name for p in dead if p.is_dir() for j in p.iterdir()))
        for folder in dead:
            shutil.rmtree(folder, ignore_errors=True)

    def _remove_scratch(self) -> None:
        """At exit: this process's scratch, and the folders above it once they are empty."""
        mine = self._scratch()
        shutil.rmtree(mine, ignore_errors=True)
        for folder in (mine.parent, mine.parent.parent):
            try:
                folder.rmdir()
            except OSError:
                break  # not empty (another incarnation, another worker) or gone already

    # -- identity and status -----------------------------------------------------------------

    def refuse_if_id_in_use(self) -> None:
        """Two live processes must not share a worker id (two Colab tabs): the second stops.

        A status file alone cannot tell a live worker from one killed a second ago (a Colab
        disconnect), so watch it: a live worker rewrites it within its interval."""
        other = self.queue.worker_status(self.me.worker_id)
        if other is None or other.incarnation == self.me.incarnation or other.state == "stopped":
            return
        window = 2 * other.interval_seconds
        if age_seconds(self.queue.clock, other.at) > window or \
                gone_from_here(other.host, other.pid, self.me):
            return
        log.info("a worker with this id was seen recently; checking whether it is alive",
                 worker_id=self.me.worker_id, seconds=round(window, 1))
        while age_seconds(self.queue.clock, other.at) <= window:
            self.queue.clock.sleep(min(0.5, window / 4))
            latest = self.queue.worker_status(self.me.worker_id)
            if latest is not None and (latest.at, latest.incarnation) != (other.at,
                                                                          other.incarnation):
                raise WorkerIdInUse(
                    f"worker id {self.me.worker_id!r} is in use by a live worker (host "
                    f"{latest.host or '?'}, pid {latest.pid}, {latest.state}). Is a second "
                    "notebook or tab running? Stop it, or start this one with another "
                    "--worker-id.")

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
        """Announce "idle" when it is news, else once every STATUS_IDLE_POLLS longest polls
        (a minute by default). The interval announced is one poll longer than that, since the
        refresh comes at the first poll after it is due; a restarted worker with our id waits
        out 2x the announced interval to tell us from a ghost."""
        every = max(1.0, STATUS_IDLE_POLLS * self.options.poll_max_seconds)
        last = self._last_status
        # Half a wait of slack: polls come a little later than their wait, never earlier.
        if last is not None and last.state == "idle" and \
                age_seconds(self.queue.clock, last.at) + wait / 2 < every:
            return
        self._write_status("idle", interval=every + self.options.poll_max_seconds)

    def _write_final_status(self) -> None:
        try:
            self._write_status("stopped", interval=0)
        except Exception as e:  # an outage must not hide why the loop ended
            if not is_outage(e):
                raise
            log.warning("could not write the worker's final status", error=str(e)[:300])

    def _write_status(self, state: str, job_id: str | None = None,
                      interval: float = POLL_MAX_SECONDS) -> WorkerStatus:
        status = WorkerStatus(worker_id=self.me.worker_id, incarnation=self.me.incarnation,
                              at=self.queue.clock.now(), state=state, interval_seconds=interval,
                              host=self.me.host, pid=self.me.pid, job_id=job_id,
                              version=__version__)
        try:
            self.queue.write_worker_status(status)
            self._last_status = status
        except OSError as e:  # status is informational: never fail on it
            log.warning("could not write worker status", error=str(e))
        return status

    @contextmanager
    def _signals(self):
        """SIGTERM/SIGINT/SIGHUP: finish the step, checkpoint, release the job, exit 0; a second
        one: exit now.

        The handler only writes the signal's number to a pipe. It runs on the main thread
        between any two bytecodes, perhaps inside a log call or an Event's lock: logging or
        setting the stop flag there can deadlock (seen: a worker hung for good on a SIGTERM that
        came during a log line). A thread reads the pipe and does both."""
        read_fd, write_fd = os.pipe()
        received: list[int] = []

        def handler(signum, _frame):
            os.write(write_fd, bytes([signum]))
            if received:
                raise KeyboardInterrupt  # the second signal
            received.append(signum)

        def watch():
            seen = 0
            while data := os.read(read_fd, 16):
                for signum in data:
                    name, seen = signal.Signals(signum).name, seen + 1
                    if seen > 1:
                        log.warning("second signal: exiting now", signal=name)
                        continue
                    busy = self._last_status is not None and self._last_status.state == "busy"
                    log.info("stop requested: " + ("checkpointing after the current step, then "
                             "handing the job back" if busy else "exiting"), signal=name)
                    self.stop.set(name)
            os.close(read_fd)

        try:
            previous = {s: signal.signal(s, handler) for s in runtime.STOP_SIGNALS}
        except ValueError:  # not the main thread (a notebook thread): no handlers to install
            previous = {}
        watcher = threading.Thread(target=watch, name="cherry-signals", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            os.close(write_fd)  # the watcher reads what is left, then ends
            watcher.join(timeout=5)


def _end_helper_processes() -> None:
    """At exit: kill loader processes still alive (an attempt's own are shut down when it
    ends; this is the safety net). They ignore SIGTERM, which is all multiprocessing's exit
    hook sends them before it waits for them without a timeout: the worker would never exit."""
    for child in multiprocessing.active_children():
        child.kill()
        child.join(timeout=5)


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


def _resolved_yaml(claim: Claim) -> bytes:
    header = (f"# The fully resolved config of job {claim.job_id} (all defaults filled in).\n")
    body = yaml.safe_dump(claim.manifest.config.model_dump(mode="json"), sort_keys=False)
    return (header + body).encode()


def _result(claim: Claim, outcome, job_state: JobState, now: datetime) -> Result:
    """The result of a job that trained (to the end, or until cancelled)."""
    state = outcome.state
    on_gpu = outcome.device is not None and not outcome.device.startswith("CPU")
    gpu_hours = state.wall_seconds / 3600 if on_gpu else 0.0
    best = BestEpoch(**state.best) if state.best else None
    return Result(
        job_id=claim.job_id, state=job_state, attempts=claim.attempt.n,
        attempt_history=claim.history, finished_at=now, worker_id=claim.attempt.worker_id,
        best=best, epochs_completed=state.epoch, steps_completed=state.global_step,
        wall_seconds=round(state.wall_seconds, 3),
        images_per_second=round(state.images_seen / state.train_seconds, 1)
        if state.train_seconds else None,
        device=outcome.device, amp=outcome.precision, torch_threads=outcome.threads,
        torch_version=_torch_version(), final_weights_sha256=outcome.final_weights_sha256,
        best_weights_sha256=state.best_weights_sha256, final_metrics=state.last_epoch,
        epochs=claim.manifest.config.epochs, evaluation=outcome.evaluation,
        micro_batch=state.micro_batch or None, oom_backoffs=state.oom_backoffs,
        gpu_hours=round(gpu_hours, 4), compute_units=runtime.compute_units(outcome.device,
                                                                           gpu_hours),
        dataset_sha256=outcome.data.get("dataset_sha256"),
        data_cache={k: v for k, v in outcome.data.items() if k != "dataset_sha256"})


def _forget_compiled_kernels(owner) -> None:
    """Compiled kernels are kept for resumed attempts only; a finished job has none."""
    try:
        owner.delete(owner.claim.paths.compiled_kernels)  # fenced, like every write of the job
    except Fenced:
        raise
    except Exception as e:  # tens of MB left behind, nothing worse: the result still counts
        log.warning("could not remove the compiled kernels", error=f"{type(e).__name__}: {e}")


def _artifacts(owner) -> dict[str, Artifact]:
    """The job's files for people, with size and sha256 (what `cherry fetch` verifies)."""
    paths, found = owner.claim.paths, {}
    for name, path in paths.artifact_paths().items():
        described = owner.describe(path)
        if described is not None:
            found[name] = Artifact(path=path.removeprefix(paths.dir + "/"), bytes=described[0],
                                   sha256=described[1])
    return found


def _failed(claim: Claim, error: Exception, now: datetime, with_traceback: bool,
            state: JobState = JobState.failed) -> Result:
    return Result(job_id=claim.job_id, state=state, attempts=claim.attempt.n,
                  attempt_history=claim.history, finished_at=now,
                  worker_id=claim.attempt.worker_id,
                  error=error_info(error, with_traceback=with_traceback))


def _torch_version() -> str | None:
    import torch

    return torch.__version__
