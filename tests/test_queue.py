"""The queue state machine on a fake file system, with an injected clock (docs/contract.md §1-3)."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import pytest
import structlog
from concurrently import at_once

from cherry_train import files
from cherry_train.jobqueue.claims import WorkerIdentity
from cherry_train.jobqueue.clock import FakeClock
from cherry_train.jobqueue.layout import JobPaths
from cherry_train.jobqueue.lifecycle import JobQueue, NotRetryable, WorkerIdInUse, setup_death_bound
from cherry_train.jobqueue.owner import Fenced
from cherry_train.jobqueue.views import all_job_ids, job_view
from cherry_train.schemas import Heartbeat, JobState, Result, validate_config
from cherry_train.storage import LocalStorage
from cherry_train.worker.checkpoints.state import TrainState
from cherry_train.worker.errors import JobError
from cherry_train.worker.identity import refuse_if_id_in_use
from cherry_train.worker.loop import EXIT_GPU_FAILED, Worker, WorkerOptions
from cherry_train.worker.outcome import Outcome

ROOT = "/queue-root"


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def queue(fs, clock):
    return JobQueue(LocalStorage(ROOT), clock)


def beat(queue, claim, **fields):
    """What the owner's heartbeat thread writes."""
    hb = Heartbeat(job_id=claim.job_id, attempt=claim.attempt.n,
                   worker_id=claim.attempt.worker_id, at=queue.clock.now(), **fields)
    queue.owner(claim).write(claim.paths.heartbeat, hb.to_json())


def config(tiny_config, **overrides):
    return validate_config({**tiny_config, **overrides})


def fake_trainer(record):
    """Stands in for train.train: 'trains' instantly, remembering what it was given."""
    def train(run):
        claim, reporter = run.claim, run.reporter
        record.append(claim.job_id)
        reporter.metric({"kind": "epoch", "epoch": 1, "step": 1, "train_loss": 1.0,
                         "train_accuracy": 0.5, "val_loss": 1.0, "val_accuracy": 0.5})
        state = TrainState(epoch=1, global_step=1, best={"epoch": 1, "val_accuracy": 0.5,
                                                         "val_loss": 1.0})
        return Outcome(completed=True, state=state, device="fake", precision="off", threads=1,
                       final_weights_sha256="ab" * 32)
    return train


def test_submit_writes_one_manifest_atomically(queue, tiny_config):
    manifest = queue.submit(config(tiny_config))
    assert queue.storage.list_dir("queue") == [f"{manifest.job_id}.json"]
    stored = json.loads(queue.storage.read_bytes(f"queue/{manifest.job_id}.json"))
    assert stored["config"]["model"]["name"] == "resnet18"
    assert manifest.job_id.startswith("20261126-100000-tiny-")
    assert job_view(queue, manifest.job_id).state == JobState.queued


def test_workers_take_jobs_by_priority_then_submission(queue, clock, tiny_config):
    low = queue.submit(config(tiny_config, name="low"))
    clock.advance(1)
    high = queue.submit(config(tiny_config, name="high", priority=5))
    clock.advance(1)
    low2 = queue.submit(config(tiny_config, name="low2"))
    manifests, bad = queue.poll.queued()
    assert [m.job_id for m in manifests] == [high.job_id, low.job_id, low2.job_id]
    assert bad == []
    ran = []
    Worker(queue, WorkerIdentity("w1"), trainer=fake_trainer(ran)).run_once()
    assert ran == [high.job_id]


def test_two_claimants_exactly_one_wins(queue, tiny_config):
    manifest = queue.submit(config(tiny_config))
    a = queue.try_claim(manifest, WorkerIdentity("a"))
    b = queue.try_claim(manifest, WorkerIdentity("b"))
    assert a is not None and a.attempt.n == 1
    assert b is None
    assert queue.storage.list_dir(JobPaths(manifest.job_id).attempts_dir) == ["1.json"]
    assert job_view(queue, manifest.job_id).state == JobState.running


class MeetBeforeCreating(LocalStorage):
    """A folder where each claimant, its checks passed, waits for the other before creating its
    attempt: both find the job free, so only the exclusive create can tell them apart."""

    def __init__(self, root, barrier: threading.Barrier):
        super().__init__(root)
        self.barrier = barrier

    def create_exclusive(self, path, data):
        if "/attempts/" in path:
            self.barrier.wait()
        return super().create_exclusive(path, data)


def test_two_claimants_past_every_check_at_once_exactly_one_wins(tmp_path, tiny_config):
    """A real race on a POSIX folder: both claimants saw no attempt (no lease to turn the second
    away), then both create attempts/1.json; the loser must come back empty-handed."""
    manifest = JobQueue(LocalStorage(tmp_path)).submit(config(tiny_config))
    barrier, claims = threading.Barrier(2, timeout=60), [None, None]

    def claim(i, queue):
        claims[i] = queue.try_claim(manifest, WorkerIdentity(f"w{i}"))

    at_once(2, claim, lambda i: JobQueue(MeetBeforeCreating(tmp_path, barrier)))
    winners = [c for c in claims if c is not None]
    assert len(winners) == 1, [c.attempt.worker_id for c in winners]
    paths = JobPaths(manifest.job_id)
    assert os.listdir(tmp_path / paths.attempts_dir) == ["1.json"]
    stored = json.loads((tmp_path / paths.attempt(1)).read_text())
    assert stored["incarnation"] == winners[0].attempt.incarnation


def test_full_lifecycle_through_the_worker(queue, tiny_config):
    manifest = queue.submit(config(tiny_config))
    ran = []
    Worker(queue, WorkerIdentity("w1"), trainer=fake_trainer(ran)).run_once()
    paths = JobPaths(manifest.job_id)
    result = Result.from_json(queue.storage.read_bytes(paths.result))
    assert result.state == JobState.succeeded and result.attempts == 1
    assert result.final_weights_sha256 == "ab" * 32
    # The manifest moved beside its result; queue/ is empty; the resolved config is there.
    assert queue.storage.list_dir("queue") == []
    assert queue.storage.exists(paths.done_manifest)
    assert "learning_rate: 0.003" in queue.storage.read_bytes(paths.config).decode()
    assert "momentum: 0.9" in queue.storage.read_bytes(paths.config).decode()  # defaults filled
    hb = Heartbeat.from_json(queue.storage.read_bytes(paths.heartbeat))
    assert hb.phase == "finished"
    assert json.loads(queue.storage.read_bytes(paths.metrics).splitlines()[0])["kind"] == "epoch"
    # Nothing left to do: the next poll finds no work.
    assert Worker(queue, WorkerIdentity("w1"), trainer=fake_trainer(ran)).run_once() is False
    assert ran == [manifest.job_id]


def test_a_killed_writers_temp_files_go_when_the_job_is_committed(queue, tiny_config):
    """A writer SIGKILLed between a temp name's write and its rename leaves the temp behind:
    a half-copied TensorBoard event file there is one TensorBoard reads (its name holds
    'tfevents'). Once the result exists nobody can still be writing the job's files."""
    manifest = queue.submit(config(tiny_config))
    paths = JobPaths(manifest.job_id)
    dead = f"{paths.tensorboard}/.events.out.tfevents.1.host.7.0{files.TMP_MARK}7-0a1b2c3d"
    Path(ROOT, dead).parent.mkdir(parents=True)
    Path(ROOT, dead).write_bytes(b"half an event file")
    Worker(queue, WorkerIdentity("w1"), trainer=fake_trainer([])).run_once()
    assert Result.from_json(queue.storage.read_bytes(paths.result)).state == JobState.succeeded
    assert not Path(ROOT, dead).exists()


def test_a_stop_during_the_listing_claims_nothing(queue, tiny_config):
    """A signal that lands while the worker lists queue/ must not be followed by a claim: an
    idle worker has a short stop bound, and a job set up in it would be cut short."""
    manifest = queue.submit(config(tiny_config))
    ran = []
    worker = Worker(queue, WorkerIdentity("w1"), trainer=fake_trainer(ran))
    listed = queue.poll.queued

    def listed_then_signalled():
        found = listed()
        worker.stop.set("signal SIGTERM")
        return found

    queue.poll.queued = listed_then_signalled
    assert worker.run_once() is False
    assert ran == [] and queue.attempts(manifest.job_id) == []


def test_commit_is_exclusive(queue, tiny_config):
    manifest = queue.submit(config(tiny_config))
    claim = queue.try_claim(manifest, WorkerIdentity("a"))
    result = Result(job_id=manifest.job_id, state=JobState.succeeded, attempts=1,
                    finished_at=queue.clock.now())
    assert queue.commit(queue.owner(claim), result) is True
    other = result.model_copy(update={"state": JobState.failed})
    assert queue.commit(queue.owner(claim), other) is False
    stored = Result.from_json(queue.storage.read_bytes(claim.paths.result))
    assert stored.state == JobState.succeeded


@pytest.mark.parametrize("content", [b"{not json", b'{"job_id": "x"}', b"\xff\xfe"])
def test_unreadable_manifest_goes_to_failed_and_the_next_job_runs(queue, tiny_config, content):
    queue.storage.write_atomic("queue/00000000-000000-junk-0000.json", content)
    good = queue.submit(config(tiny_config))
    ran = []
    worker = Worker(queue, WorkerIdentity("w1"), trainer=fake_trainer(ran))
    assert worker.run_once() is True
    assert ran == [good.job_id]
    assert sorted(queue.storage.list_dir("failed")) == [
        "00000000-000000-junk-0000.error.json", "00000000-000000-junk-0000.json"]
    assert queue.storage.read_bytes("failed/00000000-000000-junk-0000.json") == content
    error = json.loads(queue.storage.read_bytes("failed/00000000-000000-junk-0000.error.json"))
    assert error["error"]["message"]
    view = job_view(queue, "00000000-000000-junk-0000")
    assert view.state == JobState.failed and view.error


def bad_and_good(queue, clock, tiny_config, error: Exception, **bad_config):
    """A job whose trainer raises `error`, then one that trains; the worker, and what ran."""
    bad = queue.submit(config(tiny_config, name="bad", **bad_config))
    clock.advance(1)
    good = queue.submit(config(tiny_config, name="good"))
    ran = []
    ok = fake_trainer(ran)

    def trainer(run):
        if run.claim.job_id == bad.job_id:
            raise error
        return ok(run)

    return bad, good, Worker(queue, WorkerIdentity("w1"), trainer=trainer), ran


def test_a_users_error_fails_the_job_at_once_and_the_loop_goes_on(queue, tiny_config, clock):
    bad, good, worker, _ = bad_and_good(
        queue, clock, tiny_config, JobError("data.train_path: folder data/trian does not exist"))
    assert worker.run_once() and worker.run_once()
    failed = Result.from_json(queue.storage.read_bytes(JobPaths(bad.job_id).result))
    assert failed.state == JobState.failed and failed.attempts == 1
    assert failed.error.type == "JobError" and "data.train_path" in failed.error.message
    assert failed.error.traceback is None  # the user's to fix: a message, not a stack trace
    assert job_view(queue, good.job_id).state == JobState.succeeded


@pytest.mark.parametrize(("error", "advice", "retry_helps"), [
    ("model.name: 'resnet5' is not a torchvision classification model",
     "fix model.name in the config and submit it again", False),
    ("data.image_size: resnet18 cannot train at 8 px", "fix data.image_size in the config", False),
    ("data.train_path: folder data/trian does not exist", "if that was the data or a file", True),
])
def test_a_failed_job_is_advised_a_retry_only_where_one_can_succeed(queue, tiny_config, clock,
                                                                     error, advice, retry_helps):
    """Issue 28: an unknown model was shown with "`cherry retry` runs it again", which fails
    the same way. Status and watch advise by why it failed: the config (submit it again), the
    data or a file (retry once it is right), a crash loop (retry); a manifest no worker could
    read (submit again)."""
    from cherry_train.client.status import job_rows, render_table
    from cherry_train.client.watch import watch

    bad = queue.submit(config(tiny_config, name="bad"))
    crashing = queue.submit(config(tiny_config, name="crashing", max_attempts=1))
    queue.storage.write_atomic("queue/00000000-000000-junk-0000.json", b"{not json")

    def trainer(run):
        raise JobError(error) if run.claim.job_id == bad.job_id else KeyError("a bug")

    worker = Worker(queue, WorkerIdentity("w1"), trainer=trainer)
    while worker.run_once():
        pass
    lines = render_table(job_rows(queue), []).splitlines()
    (said,) = [x for x in lines if x.startswith(f"! {bad.job_id} failed")]
    assert advice in said and ("cherry retry" in said) == retry_helps, said
    (crash,) = [x for x in lines if x.startswith(f"! {crashing.job_id} failed")]
    assert crash.endswith(f"(`cherry retry {crashing.job_id}` runs it again from its newest "
                          "checkpoint)")
    (junk,) = [x for x in lines if x.startswith("! 00000000-000000-junk-0000 failed")]
    assert "submit it again" in junk and "cherry retry" not in junk
    told = []
    assert watch(queue, bad.job_id, say=told.append, progress=False) == JobState.failed
    assert advice in told[-1] and ("cherry retry" in told[-1]) == retry_helps, told


def test_an_unexpected_error_hands_the_job_back_until_max_attempts(queue, tiny_config, clock):
    bad, good, worker, ran = bad_and_good(queue, clock, tiny_config,
                                          KeyError("a bug, not the job's fault"), max_attempts=3)
    assert worker.run_once()  # attempt 1 ends by the error: handed back, not failed
    view = job_view(queue, bad.job_id)
    assert view.state == JobState.running and not view.stalled
    assert view.heartbeat.released and view.heartbeat.error.type == "KeyError"
    from cherry_train.client.status import job_rows, render_table

    rows = job_rows(queue)
    assert "handed back after an error" in render_table(rows, [])
    assert "KeyError" in next(r for r in rows if r["job_id"] == bad.job_id)["error"]

    assert worker.run_once() and worker.run_once()  # attempts 2 and 3, the same error
    assert ran == []
    second = queue.attempts(bad.job_id)[1]
    assert second.reason == "after-error" and second.previous.error.type == "KeyError"
    assert worker.run_once() and ran == [good.job_id]  # bad gives up; the loop goes on
    failed = Result.from_json(queue.storage.read_bytes(JobPaths(bad.job_id).result))
    assert failed.state == JobState.failed and failed.error.type == "CrashLoop"
    assert "3 consecutive attempts" in failed.error.message
    assert "the last error: KeyError" in failed.error.message
    assert "Traceback" in failed.error.traceback
    assert f"cherry retry {bad.job_id}" in failed.error.message


def test_a_cuda_error_hands_the_job_back_and_ends_the_worker(queue, tiny_config):
    job = queue.submit(config(tiny_config, name="gpu"))

    def trainer(run):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    worker = Worker(queue, WorkerIdentity("w1"), WorkerOptions(poll_min_seconds=0.01),
                    trainer=trainer)
    assert worker.run() == EXIT_GPU_FAILED  # its CUDA context is unusable: start afresh
    assert len(queue.attempts(job.job_id)) == 1  # it did not take the job again
    hb = job_view(queue, job.job_id).heartbeat
    assert hb.released and "illegal memory access" in hb.error.message
    assert not queue.storage.exists(JobPaths(job.job_id).result)


def test_an_error_after_a_stop_request_hands_the_job_back_as_released(queue, tiny_config):
    job = queue.submit(config(tiny_config))
    worker = Worker(queue, WorkerIdentity("w1"))

    def trainer(run):
        worker.stop.set("SIGTERM")  # the signal came; a loader process died of it
        raise RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")

    worker.trainer = trainer
    assert worker.run() == 0
    hb = job_view(queue, job.job_id).heartbeat
    assert hb.released and hb.error is None  # a stop, not a crash: not counted
    claim = queue.try_claim(queue.poll.queued()[0][0], WorkerIdentity("w2"))
    assert claim.attempt.reason == "released"


def test_the_exit_line_counts_finished_and_handed_back_jobs_apart(queue, tiny_config):
    done = queue.submit(config(tiny_config, name="done", priority=1))
    handed = queue.submit(config(tiny_config, name="handed"))
    worker = Worker(queue, WorkerIdentity("w1"), WorkerOptions(poll_min_seconds=0.01))
    finish = fake_trainer([])

    def trainer(run):
        if run.claim.job_id == done.job_id:
            return finish(run)
        worker.stop.set("SIGTERM")  # a stop while the second job trains: handed back
        return Outcome(completed=False, state=TrainState(), device="fake", precision="off",
                       threads=1)

    worker.trainer = trainer
    with structlog.testing.capture_logs() as logs:
        assert worker.run() == 0
    (exiting,) = [x for x in logs if x["event"] == "worker exiting"]
    assert (exiting["jobs_finished"], exiting["jobs_handed_back"]) == (1, 1)
    assert job_view(queue, handed.job_id).heartbeat.released


def test_heartbeat_age_marks_a_running_job_stalled(queue, clock, tiny_config):
    manifest = queue.submit(config(tiny_config))  # lease 5 s
    claim = queue.try_claim(manifest, WorkerIdentity("a"))
    beat(queue, claim)
    clock.advance(4)
    assert job_view(queue, claim.job_id).stalled is False
    clock.advance(2)
    view = job_view(queue, claim.job_id)
    assert view.state == JobState.running and view.stalled is True


def test_takeover_only_after_the_lease_expires(queue, clock, tiny_config):
    manifest = queue.submit(config(tiny_config))
    first = queue.try_claim(manifest, WorkerIdentity("a"))
    clock.advance(4)
    assert queue.try_claim(manifest, WorkerIdentity("b")) is None  # lease (5 s) still held
    clock.advance(2)
    second = queue.try_claim(manifest, WorkerIdentity("b"))
    assert second is not None and second.attempt.n == 2
    assert second.attempt.reason == "lease-expired"
    # Fencing: the old owner may write nothing more.
    with pytest.raises(Fenced):
        beat(queue, first)
    with pytest.raises(Fenced):
        queue.commit(queue.owner(first), Result(job_id=first.job_id, state=JobState.succeeded,
                                         attempts=1, finished_at=clock.now()))
    assert not queue.storage.exists(first.paths.result)
    queue.owner(second).write(second.paths.compiled_kernels, b"the new owner's kernels")
    with pytest.raises(Fenced):  # deleting is writing too
        queue.owner(first).delete(first.paths.compiled_kernels)
    assert queue.storage.exists(second.paths.compiled_kernels)


def test_same_worker_id_takes_its_job_back_fast(queue, clock, tiny_config):
    manifest = queue.submit(config(tiny_config))  # heartbeat 0.2 s, lease 5 s
    queue.try_claim(manifest, WorkerIdentity("colab-1", incarnation="before-disconnect"))
    restarted = WorkerIdentity("colab-1", incarnation="after-restart")
    with pytest.raises(WorkerIdInUse):
        queue.try_claim(manifest, restarted)  # heartbeat too fresh: a second tab?
    clock.advance(0.5)  # > 2 x heartbeat_seconds, << lease_seconds
    claim = queue.try_claim(manifest, restarted)
    assert claim is not None and claim.attempt.reason == "same-worker"



def test_a_dead_pid_on_this_host_is_no_second_worker(queue, clock, tiny_config):
    """A double Ctrl-C: the process died without releasing, its heartbeat is fresh, but its pid
    on this very host is gone. The restart takes the job back at once."""
    import socket
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    manifest = queue.submit(config(tiny_config))
    here = socket.gethostname()
    queue.try_claim(manifest, WorkerIdentity("vm", incarnation="killed", host=here,
                                             pid=gone.pid))
    claim = queue.try_claim(manifest, WorkerIdentity("vm", incarnation="restarted", host=here))
    assert claim is not None and claim.attempt.reason == "same-worker"
    # The same on another host, or with a live pid here, is still refused: it may be running.
    for host, pid in (("other-vm", gone.pid), (here, os.getppid())):
        other = queue.submit(config({**tiny_config, "name": f"x{pid}"}))
        queue.try_claim(other, WorkerIdentity("vm", incarnation="a", host=host, pid=pid))
        with pytest.raises(WorkerIdInUse, match="clears once its heartbeat is 0.4 s old"):
            queue.try_claim(other, WorkerIdentity("vm", incarnation="b", host=here))


def test_a_live_pid_here_is_the_worker_only_if_it_started_before_its_status():
    """A worker's pid on this host, alive, proves it runs (a second worker with its id is
    refused at once) only if that process started before the status was written: a pid taken
    over by a later process is not the worker."""
    import socket
    import subprocess
    import sys
    from datetime import datetime, timedelta, timezone

    from cherry_train.jobqueue.claims import still_running_here

    here, now = socket.gethostname(), datetime.now(timezone.utc)
    me = WorkerIdentity("vm", host=here)
    later = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not still_running_here(here, later.pid, now - timedelta(seconds=5), me)
        assert still_running_here(here, later.pid, now + timedelta(seconds=5), me)
        assert not still_running_here("other-vm", later.pid, now + timedelta(seconds=5), me)
    finally:
        later.kill()
        later.wait()
    assert not still_running_here(here, later.pid, now + timedelta(seconds=5), me)  # gone


def test_released_job_can_be_taken_at_once(queue, clock, tiny_config):
    manifest = queue.submit(config(tiny_config))
    beat(queue, queue.try_claim(manifest, WorkerIdentity("a")), released=True)
    claim = queue.try_claim(manifest, WorkerIdentity("b"))
    assert claim is not None and claim.attempt.reason == "released"


def test_crash_loop_gives_up_after_max_attempts(queue, clock, tiny_config):
    manifest = queue.submit(config(tiny_config, max_attempts=2))
    for worker in ("a", "b"):
        claim = queue.try_claim(manifest, WorkerIdentity(worker))
        beat(queue, claim, phase="training", trained=True, step=1)
        clock.advance(6)  # dies while training, before a checkpoint; the lease runs out
    assert queue.try_claim(manifest, WorkerIdentity("c")) is None
    result = Result.from_json(queue.storage.read_bytes(JobPaths(manifest.job_id).result))
    assert result.state == JobState.failed and result.error.type == "CrashLoop"
    assert [a.worker_id for a in result.attempt_history] == ["a", "b"]
    assert queue.storage.list_dir("queue") == []


def test_deaths_in_set_up_count_against_a_larger_bound(queue, clock, tiny_config):
    """A Colab tab closed while the job copied its data is not the job's fault; a set-up that
    kills its worker every time still ends."""
    manifest = queue.submit(config(tiny_config, max_attempts=2))
    bound = setup_death_bound(2)
    assert bound > 2
    for i in range(bound):
        claim = queue.try_claim(manifest, WorkerIdentity(f"w{i}"))
        assert claim is not None, f"gave up after {i} set-up deaths"
        beat(queue, claim, phase="copying data")
        clock.advance(6)
    assert queue.try_claim(manifest, WorkerIdentity("last")) is None
    result = Result.from_json(queue.storage.read_bytes(JobPaths(manifest.job_id).result))
    assert result.error.type == "CrashLoop" and "before their first training step" in \
        result.error.message


def test_a_stop_on_purpose_between_crashes_does_not_reset_nor_count(queue, clock, tiny_config):
    manifest = queue.submit(config(tiny_config, max_attempts=2))
    claim = queue.try_claim(manifest, WorkerIdentity("a"))
    beat(queue, claim, trained=True)
    clock.advance(6)  # crash 1
    claim = queue.try_claim(manifest, WorkerIdentity("b"))
    beat(queue, claim, trained=True, released=True)  # SIGTERM: handed back, not a crash
    claim = queue.try_claim(manifest, WorkerIdentity("c"))
    assert claim is not None and claim.attempt.reason == "released"
    beat(queue, claim, trained=True)
    clock.advance(6)  # crash 2
    assert queue.try_claim(manifest, WorkerIdentity("d")) is None


def test_retry_puts_a_failed_job_back_with_the_count_afresh(queue, clock, tiny_config, capsys):
    manifest = queue.submit(config(tiny_config, max_attempts=1))
    paths = JobPaths(manifest.job_id)
    claim = queue.try_claim(manifest, WorkerIdentity("a"))
    queue.storage.write_atomic(paths.checkpoint(4), b"ckpt")
    queue.storage.write_atomic(paths.checkpoint_checksum(4), b"sum")
    clock.advance(6)  # killed after its checkpoint
    claim = queue.try_claim(manifest, WorkerIdentity("a"))  # resumed from step 4 ...
    beat(queue, claim, trained=True)
    clock.advance(6)  # ... and killed before its next checkpoint: max_attempts=1 is spent
    assert queue.try_claim(manifest, WorkerIdentity("b")) is None
    assert job_view(queue, manifest.job_id).state == JobState.failed

    other = queue.submit(config(tiny_config, name="other"))
    with pytest.raises(NotRetryable, match="not finished"):
        queue.retry(other.job_id)
    queue.retry(manifest.job_id)
    view = job_view(queue, manifest.job_id)
    assert view.state == JobState.queued
    assert queue.storage.list_dir(f"{paths.dir}/results") == ["1.json"]  # the old result, kept
    requeued = next(m for m in queue.poll.queued()[0] if m.job_id == manifest.job_id)
    assert requeued.retried_after_attempt == 2
    claim = queue.try_claim(requeued, WorkerIdentity("b"))  # at once: no lease to wait for
    assert claim is not None and claim.attempt.reason == "retried"
    assert claim.attempt.n == 3 and claim.attempt.checkpoint_at_start == 4
    with pytest.raises(NotRetryable, match="not finished"):
        queue.retry(manifest.job_id)


def test_retry_of_a_cancelled_job_and_of_a_succeeded_one(queue, tiny_config):
    manifest = queue.submit(config(tiny_config))
    assert queue.request_cancel(manifest.job_id)
    assert queue.try_claim(manifest, WorkerIdentity("a")) is None  # committed: cancelled
    assert job_view(queue, manifest.job_id).state == JobState.cancelled
    queue.retry(manifest.job_id)
    assert not queue.cancel_requested(manifest.job_id)
    worker = Worker(queue, WorkerIdentity("a"), trainer=fake_trainer([]))
    assert worker.run_once()
    assert job_view(queue, manifest.job_id).state == JobState.succeeded
    with pytest.raises(NotRetryable, match="succeeded"):
        queue.retry(manifest.job_id)


def test_retry_of_a_job_cancelled_before_any_worker_met_it(queue, clock, tiny_config):
    """Cancelled while queued: no result yet, only the request, and status says `cancelled`;
    retry takes it as it takes any cancelled job (issue 28). So too a retried job cancelled
    again before its next attempt."""
    fresh = queue.submit(config(tiny_config))
    failed = queue.submit(config(tiny_config, name="failed", max_attempts=1))
    beat(queue, queue.try_claim(failed, WorkerIdentity("a")), trained=True)
    clock.advance(6)  # killed before a checkpoint: a crash loop at max_attempts=1
    assert queue.try_claim(failed, WorkerIdentity("a")) is None
    assert job_view(queue, failed.job_id).state == JobState.failed
    queue.retry(failed.job_id)
    for job_id in (fresh.job_id, failed.job_id):
        assert queue.request_cancel(job_id)
        assert job_view(queue, job_id).state == JobState.cancelled
        queue.retry(job_id)
        assert not queue.cancel_requested(job_id)
        assert job_view(queue, job_id).state == JobState.queued
    ran = []
    worker = Worker(queue, WorkerIdentity("a"), trainer=fake_trainer(ran))
    while worker.run_once():
        pass
    assert sorted(ran) == sorted([fresh.job_id, failed.job_id])  # run, not ended as cancelled
    assert {job_view(queue, j).state for j in ran} == {JobState.succeeded}


def test_a_cached_status_row_never_outlives_the_result_it_was_read_from(queue, tiny_config):
    """Issue 28: cancelled while running, `cherry status` (the row is cached), `cherry retry`,
    the job resumes and succeeds with no status call in between: status says succeeded, not
    the cached `cancelled`. So too for a result rewritten in any other way."""
    from cherry_train.client.status import job_rows

    manifest = queue.submit(config(tiny_config))
    claim = queue.try_claim(manifest, WorkerIdentity("a"))
    queue.commit(queue.owner(claim), Result(job_id=manifest.job_id, state=JobState.cancelled,
                                            attempts=1, finished_at=queue.clock.now()))
    assert [r["state"] for r in job_rows(queue)] == ["cancelled"]  # and cached
    queue.retry(manifest.job_id)
    assert Worker(queue, WorkerIdentity("a"), trainer=fake_trainer([])).run_once()
    assert queue.storage.list_dir("queue") == []  # nothing in queue/ says it moved
    (row,) = job_rows(queue)
    assert (row["state"], row["attempt"], row["best_val_accuracy"]) == ("succeeded", 2, 0.5)
    result = Result.from_json(queue.storage.read_bytes(JobPaths(manifest.job_id).result))
    queue.storage.write_atomic(JobPaths(manifest.job_id).result, result.model_copy(
        update={"best": result.best.model_copy(update={"val_accuracy": 0.75})}).to_json())
    assert job_rows(queue)[0]["best_val_accuracy"] == 0.75
    assert job_rows(queue)[0]["best_val_accuracy"] == 0.75  # from the cache, still right


def test_attempts_that_checkpoint_do_not_count_as_a_crash_loop(queue, clock, tiny_config):
    manifest = queue.submit(config(tiny_config, max_attempts=2))
    paths = JobPaths(manifest.job_id)
    for step in range(1, 6):  # five deaths while training, each after a new checkpoint
        claim = queue.try_claim(manifest, WorkerIdentity(f"w{step}"))
        assert claim is not None, f"gave up after {step - 1} attempts that each checkpointed"
        # It trained (a death now is a crash, not a set-up death with its larger bound).
        beat(queue, claim, phase="training", trained=True, step=step)
        queue.storage.write_atomic(paths.checkpoint(step), b"ckpt")
        queue.storage.write_atomic(paths.checkpoint_checksum(step), b"sum")
        clock.advance(6)
    claim = queue.try_claim(manifest, WorkerIdentity("w6"))
    assert claim is not None and claim.attempt.n == 6 and claim.attempt.checkpoint_at_start == 5


def test_worker_refuses_to_start_under_a_live_workers_id(queue, clock, monkeypatch):
    live = Worker(queue, WorkerIdentity("colab-1"))
    live._write_status("idle", interval=5)
    read = queue.worker_status

    def still_writing(worker_id):  # the live worker rewrites its status while we watch
        live._write_status("idle", interval=5)
        return read(worker_id)

    monkeypatch.setattr(queue, "worker_status", still_writing)
    with pytest.raises(WorkerIdInUse, match="second notebook"):
        refuse_if_id_in_use(queue, WorkerIdentity("colab-1"))


def test_a_restarted_worker_is_not_refused_by_its_dead_predecessor(queue, clock):
    dead = Worker(queue, WorkerIdentity("colab-1"))
    dead._write_status("busy", interval=5)  # killed right after this write
    started = clock.now()
    refuse_if_id_in_use(queue, WorkerIdentity("colab-1"))  # watches 2 x 5 s: no new write
    assert 10 <= (clock.now() - started).total_seconds() <= 11


def test_exit_when_idle_stops_on_an_empty_queue(queue):
    from cherry_train.worker.loop import WorkerOptions

    worker = Worker(queue, WorkerIdentity("w1"), WorkerOptions(exit_when_idle=True),
                    trainer=fake_trainer([]))
    assert worker.run() == 0
    status = queue.worker_status("w1")
    assert status.state == "stopped"


def test_a_started_worker_removes_only_its_own_dead_incarnations_scratch(fs, queue):
    """A SIGKILL during torch.save leaves a partial checkpoint in local scratch; a restarted
    worker with the same id on the same root clears what dead processes left, and never what
    a live one has, nor what a worker with the same id on another root has."""
    from cherry_train.worker.loop import WorkerOptions

    options = WorkerOptions(exit_when_idle=True, scratch=Path("/scratch"))
    worker = Worker(queue, WorkerIdentity("w1"), options, trainer=fake_trainer([]))
    base = worker.scratch.base()
    dead_pid = 2**22 + 12345  # above any pid_max: no such process
    dead, live = base / f"{dead_pid}-0ld1nc4rn4t1" / "job-a", base / f"{os.getpid()}-l1ve" / "job-b"
    other_root = Worker(JobQueue(LocalStorage("/other-root"), queue.clock),
                        WorkerIdentity("w1"), options).scratch.base() / f"{dead_pid}-x" / "job-c"
    assert other_root.parent.parent != base
    for folder in (dead, live, other_root):
        fs.create_file(folder / "step-000000003.pt.partial", contents="x" * 1000)
    assert worker.run() == 0
    assert not dead.parent.exists()
    assert (live / "step-000000003.pt.partial").is_file()
    assert (other_root / "step-000000003.pt.partial").is_file()
    assert not worker.scratch.mine().exists()  # its own goes at exit


def test_a_worker_leaves_no_empty_scratch_folders(fs, queue, tiny_config):
    from cherry_train.worker.loop import WorkerOptions

    queue.submit(config(tiny_config))
    options = WorkerOptions(exit_when_idle=True, scratch=Path("/scratch"))

    def trains_in_scratch(run):  # a checkpoint written locally before it is published
        run.scratch.mkdir(parents=True, exist_ok=True)
        (run.scratch / "step-000000001.pt").write_bytes(b"x")
        return fake_trainer([])(run)

    assert Worker(queue, WorkerIdentity("w1"), options, trainer=trains_in_scratch).run() == 0
    assert list(Path("/scratch").iterdir()) == []  # the top stays: the user's (or private)


class Unreachable(LocalStorage):
    """A queue root whose next `failures` listings fail past the storage's own retries."""

    failures = 0

    def list_dir(self, path):
        if self.failures > 0:
            self.failures -= 1
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")
        return super().list_dir(path)


def test_a_worker_left_running_outlives_an_outage_of_its_queue_root(fs, clock, tiny_config):
    from cherry_train.worker.loop import WorkerOptions

    storage = Unreachable(ROOT)
    queue = JobQueue(storage, clock)
    manifest = queue.submit(config(tiny_config))
    storage.failures = 3
    ran = []
    worker = Worker(queue, WorkerIdentity("w1"),
                    WorkerOptions(idle_shutdown_minutes=1, release_runtime=lambda: None),
                    trainer=fake_trainer(ran))
    with structlog.testing.capture_logs() as logs:
        assert worker.run() == 0  # idle shutdown, once the job is done
    outages = [x for x in logs if x["event"] == "the queue root cannot be reached; trying again"]
    assert [x["retry_in_seconds"] for x in outages] == [1.0, 2.0, 4.0]  # backing off
    assert ran == [manifest.job_id]
    assert job_view(queue, manifest.job_id).state == JobState.succeeded


def test_a_job_whose_commit_met_an_outage_is_taken_up_again_by_the_same_worker(fs, clock,
                                                                             tiny_config):
    from cherry_train.worker.loop import WorkerOptions

    class CommitFails(LocalStorage):
        failed = []

        def create_exclusive(self, path, data):
            if path.endswith("result.json") and not self.failed:
                self.failed.append(path)
                raise OSError(errno.EIO, "Input/output error")
            return super().create_exclusive(path, data)

    queue = JobQueue(CommitFails(ROOT), clock)
    manifest = queue.submit(config(tiny_config))
    ran = []
    worker = Worker(queue, WorkerIdentity("w1"),
                    WorkerOptions(idle_shutdown_minutes=1, release_runtime=lambda: None),
                    trainer=fake_trainer(ran))
    assert worker.run() == 0
    assert ran == [manifest.job_id] * 2  # the lost commit, then its retake
    result = Result.from_json(queue.storage.read_bytes(JobPaths(manifest.job_id).result))
    assert result.state == JobState.succeeded and result.attempts == 2


def test_a_worker_run_by_a_script_does_not_wait_out_an_outage(fs, clock, tiny_config):
    from cherry_train.worker.loop import WorkerOptions

    storage = Unreachable(ROOT)
    storage.failures = 1
    worker = Worker(JobQueue(storage, clock), WorkerIdentity("w1"),
                    WorkerOptions(exit_when_idle=True), trainer=fake_trainer([]))
    with pytest.raises(OSError, match="not connected"):
        worker.run()


def test_state_derivation_order(queue, clock, tiny_config):
    manifest = queue.submit(config(tiny_config))
    paths = JobPaths(manifest.job_id)
    assert job_view(queue, manifest.job_id).state == JobState.queued
    claim = queue.try_claim(manifest, WorkerIdentity("a"))
    assert job_view(queue, manifest.job_id).state == JobState.running
    queue.commit(queue.owner(claim), Result(job_id=claim.job_id, state=JobState.cancelled,
                                     attempts=1, finished_at=clock.now()))
    assert job_view(queue, manifest.job_id).state == JobState.cancelled  # result wins over all
    assert queue.storage.exists(paths.done_manifest)
    assert all_job_ids(queue) == [manifest.job_id]


def test_a_crash_between_commit_and_move_is_completed_by_the_next_worker(queue, tiny_config):
    manifest = queue.submit(config(tiny_config))
    claim = queue.try_claim(manifest, WorkerIdentity("a"))
    result = Result(job_id=claim.job_id, state=JobState.succeeded, attempts=1,
                    finished_at=queue.clock.now())
    queue.storage.create_exclusive(claim.paths.result, result.to_json())  # ...then killed
    assert queue.storage.list_dir("queue") == [f"{claim.job_id}.json"]
    ran = []
    assert Worker(queue, WorkerIdentity("b"), trainer=fake_trainer(ran)).run_once() is False
    assert ran == [] and queue.storage.list_dir("queue") == []
    assert queue.storage.exists(claim.paths.done_manifest)


def test_a_fresh_takeover_is_not_shown_stalled_by_the_old_heartbeat(queue, clock, tiny_config):
    manifest = queue.submit(config(tiny_config))
    beat(queue, queue.try_claim(manifest, WorkerIdentity("a")))
    clock.advance(60)
    assert job_view(queue, manifest.job_id).stalled is True
    queue.try_claim(manifest, WorkerIdentity("b"))  # attempt 2, no heartbeat of its own yet
    view = job_view(queue, manifest.job_id)
    assert view.attempt.n == 2 and view.stalled is False and view.heartbeat is None


def test_a_refused_worker_leaves_the_live_workers_status_alone(queue, clock, tiny_config):
    from cherry_train.worker.loop import WorkerOptions

    manifest = queue.submit(config(tiny_config))
    claim = queue.try_claim(manifest, WorkerIdentity("colab-1", incarnation="live"))
    live = Worker(queue, WorkerIdentity("colab-1", incarnation="live"))
    live._write_status("busy", manifest.job_id)
    clock.advance(61)  # its worker status is old enough to pass the start-up check...
    beat(queue, claim)  # ...but the job's heartbeat is fresh
    second = Worker(queue, WorkerIdentity("colab-1", incarnation="second-tab"),
                    WorkerOptions(exit_when_idle=True), trainer=fake_trainer([]))
    with pytest.raises(WorkerIdInUse):
        second.run()
    assert queue.worker_status("colab-1").incarnation == "live"


def test_cancelled_queued_job_never_starts(queue, tiny_config):
    manifest = queue.submit(config(tiny_config))
    assert queue.request_cancel(manifest.job_id) is True
    assert queue.request_cancel(manifest.job_id) is False  # asked before: nothing new
    assert job_view(queue, manifest.job_id).state == JobState.cancelled  # before any worker acts
    ran = []
    Worker(queue, WorkerIdentity("w1"), trainer=fake_trainer(ran)).run_once()
    assert ran == []
    result = Result.from_json(queue.storage.read_bytes(JobPaths(manifest.job_id).result))
    assert result.state == JobState.cancelled and result.attempts == 0
    assert queue.storage.list_dir("queue") == []


def test_cancelled_stalled_job_is_ended_by_the_next_worker(queue, clock, tiny_config):
    manifest = queue.submit(config(tiny_config))
    claim = queue.try_claim(manifest, WorkerIdentity("a"))
    beat(queue, claim)
    queue.request_cancel(manifest.job_id)
    assert job_view(queue, manifest.job_id).state == JobState.running  # its owner may still act
    assert job_view(queue, manifest.job_id).cancel_requested
    clock.advance(6)  # the owner died: lease expired
    ran = []
    Worker(queue, WorkerIdentity("b"), trainer=fake_trainer(ran)).run_once()
    assert ran == []
    assert job_view(queue, manifest.job_id).state == JobState.cancelled


def test_a_running_job_sees_the_cancel_at_its_next_heartbeat(queue, tiny_config):
    manifest = queue.submit(config(tiny_config))
    seen = []

    def trainer(run):
        claim, reporter, stop = run.claim, run.reporter, run.stop
        queue.request_cancel(claim.job_id)
        reporter.beat()
        seen.append(stop.reason)
        state = TrainState(epoch=0, global_step=3)
        return Outcome(completed=False, state=state, device="fake", precision="off", threads=1)

    worker = Worker(queue, WorkerIdentity("w1"), trainer=trainer)
    worker.run_once()
    assert seen == ["cancel"]
    result = Result.from_json(queue.storage.read_bytes(JobPaths(manifest.job_id).result))
    assert result.state == JobState.cancelled and result.steps_completed == 3
    assert not worker.stop.is_set()  # the cancel ended the job, not the worker


def test_an_outage_of_heartbeats_is_one_traceback_not_one_per_beat(queue, tiny_config):
    import time

    queue.submit(config(tiny_config))  # heartbeat_seconds: 0.2
    failures = 3

    def trainer(run):
        reporter = run.reporter
        write, left = reporter.owner.write, [failures]

        def flaky(path, data):
            if path.endswith("heartbeat.json") and left[0] > 0:
                left[0] -= 1
                raise OSError(errno.EIO, "Input/output error")
            return write(path, data)

        reporter.owner.write = flaky
        deadline = time.monotonic() + 10  # the outage, then one good beat
        while not any(x["event"] == "heartbeat written again" for x in logs) and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        return Outcome(completed=False, state=TrainState(), device="fake", precision="off",
                       threads=1)

    with structlog.testing.capture_logs() as logs:
        Worker(queue, WorkerIdentity("w1"), trainer=trainer).run_once()
    events = [x["event"] for x in logs if "heartbeat" in x["event"]]
    assert events == ["heartbeat failed; trying again at every beat", "heartbeat still failing",
                      "heartbeat still failing", "heartbeat written again"]


def test_journal_records_claims_and_fenced_writes(queue, clock, tiny_config,
                                                  monkeypatch):
    journal = "/journal.jsonl"
    monkeypatch.setenv("CHERRY_JOURNAL", journal)
    manifest = queue.submit(config(tiny_config))
    first = queue.try_claim(manifest, WorkerIdentity("a"))
    beat(queue, first)
    clock.advance(6)
    queue.try_claim(manifest, WorkerIdentity("b"))
    with pytest.raises(Fenced):
        beat(queue, first)
    events = [json.loads(line) for line in Path(journal).read_text().splitlines()]
    assert [(e["event"], e["attempt"]) for e in events] == [
        ("claim", 1), ("write", 1), ("claim", 2)]  # the fenced write never happened
