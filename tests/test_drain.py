"""`cherry drain WORKER_ID`: the worker finishes the job it trains, takes no new one, exits 0;
`cherry status` shows it draining, then stopped. Unit tests on a fake trainer, and one on a real
worker process mid-job."""

from __future__ import annotations

import json

import pytest
import structlog

from cherry_train.cli import main
from cherry_train.jobqueue import layout
from cherry_train.jobqueue.claims import WorkerIdentity
from cherry_train.jobqueue.clock import FakeClock
from cherry_train.jobqueue.layout import JobPaths
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.jobqueue.views import job_view
from cherry_train.jobqueue.workercontrol import UnknownWorker, request_drain
from cherry_train.schemas import JobState, Result, WorkerState, WorkerStatus, validate_config
from cherry_train.storage import LocalStorage
from cherry_train.worker.checkpoints.state import TrainState
from cherry_train.worker.loop import Worker, WorkerOptions
from cherry_train.worker.outcome import Outcome


@pytest.fixture
def queue(tmp_path):
    return JobQueue(LocalStorage(tmp_path / "root"), FakeClock())


def status(queue: JobQueue, worker_id: str, state=WorkerState.idle, job_id=None) -> None:
    queue.write_worker_status(WorkerStatus(worker_id=worker_id, incarnation="x",
                                           at=queue.clock.now(), state=state, job_id=job_id))


def finished(run) -> Outcome:
    return Outcome(completed=True, state=TrainState(epoch=1, global_step=1), device="fake",
                   precision="off", threads=1)


def test_an_idle_worker_asked_to_drain_claims_nothing_and_exits_0(queue, tiny_config):
    status(queue, "w1")
    assert request_drain(queue, "w1") is True
    assert request_drain(queue, "w1") is False  # asked before
    job = queue.submit(validate_config(tiny_config))
    worker = Worker(queue, WorkerIdentity("w1"), WorkerOptions(poll_min_seconds=0.01))
    worker.trainer = lambda run: pytest.fail("a drained worker claimed a job")
    written = []
    write = queue.write_worker_status
    queue.write_worker_status = lambda s: (written.append(s.state), write(s))
    with structlog.testing.capture_logs() as logs:
        assert worker.run() == 0
    assert queue.attempts(job.job_id) == []  # no attempt: it was never claimed
    assert written[-2:] == [WorkerState.draining, WorkerState.stopped]
    assert [x["reason"] for x in logs if x["event"] == "worker exiting"] == ["drained"]
    # The request is done: a later start under this id works on.
    assert not queue.storage.exists(layout.drain_request_path("w1"))


def test_a_drain_seen_at_a_heartbeat_lets_the_job_finish_then_no_new_claim(queue, tiny_config):
    first = queue.submit(validate_config({**tiny_config, "name": "first", "priority": 1}))
    second = queue.submit(validate_config({**tiny_config, "name": "second"}))
    worker = Worker(queue, WorkerIdentity("w1"), WorkerOptions(poll_min_seconds=0.01))
    seen = []

    def trainer(run):
        request_drain(queue, "w1")  # mid-job, from a laptop
        run.reporter.beat()  # the heartbeat thread's next beat
        seen.append(queue.worker_status("w1").state)
        return finished(run)

    worker.trainer = trainer
    assert worker.run() == 0
    assert seen == [WorkerState.draining]  # `cherry status` shows it while the job trains
    result = Result.from_json(queue.storage.read_bytes(JobPaths(first.job_id).result))
    assert result.state == JobState.succeeded
    assert job_view(queue, second.job_id).state == JobState.queued
    assert queue.attempts(second.job_id) == []
    assert queue.worker_status("w1").state == WorkerState.stopped


def test_drain_from_the_command_line(tmp_path, capsys):
    root = tmp_path / "root"
    queue = JobQueue(LocalStorage(root))
    status(queue, "colab-1", WorkerState.busy, job_id="20261204-job-7f3a")
    status(queue, "colab-2", WorkerState.stopped)
    assert main(["drain", "colab-1", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "drain requested for colab-1" in out and "20261204-job-7f3a" in out
    assert main(["drain", "colab-1", "--root", str(root)]) == 0
    assert "requested already" in capsys.readouterr().out
    assert main(["status", "--root", str(root)]) == 0
    assert "colab-1 (draining, seen" in capsys.readouterr().out
    # A stopped worker: nothing to drain, and no request left to drain its next start.
    assert main(["drain", "colab-2", "--root", str(root)]) == 0
    assert "stopped already" in capsys.readouterr().out
    assert not queue.storage.exists(layout.drain_request_path("colab-2"))


@pytest.mark.parametrize("worker_id", ["colab-9", "../workers/colab-1"])
def test_drain_of_an_unknown_worker_is_one_line_and_exit_2(tmp_path, capsys, worker_id):
    root = tmp_path / "root"
    queue = JobQueue(LocalStorage(root))
    status(queue, "colab-1")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    assert main(["drain", worker_id, "--root", str(root)]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert f"no worker {worker_id!r}" in captured.err and "known: colab-1" in captured.err
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # nothing written
    with pytest.raises(UnknownWorker):
        request_drain(queue, worker_id)


@pytest.mark.slow
def test_a_real_worker_drained_mid_job_finishes_it_and_exits_0(tmp_path, cherry_images, capsys):
    from test_crash import CRASH_CONFIG, heartbeat, kill, make_root, start_worker, wait_for

    root = make_root(tmp_path, cherry_images, "drain")
    queue = JobQueue(LocalStorage(root))
    cfg = {**CRASH_CONFIG, "training": {**CRASH_CONFIG["training"], "epochs": 6}}
    first = queue.submit(validate_config({**cfg, "name": "first", "priority": 1})).job_id
    second = queue.submit(validate_config({**cfg, "name": "second"})).job_id
    # First in line, but for a GPU: this CPU worker passes it over (its capabilities are
    # measured by `cherry worker` itself) and never makes an attempt of it.
    gpu_job = queue.submit(validate_config({**cfg, "name": "gpu", "priority": 2,
                                            "requires": {"device": "cuda"}})).job_id
    proc = start_worker(root, "colab-1", tmp_path / "j.jsonl", exit_when_idle=False)
    try:
        wait_for(lambda: (hb := heartbeat(root, first)) and hb.step >= 2, 60, "training")
        assert main(["drain", "colab-1", "--root", str(root)]) == 0
        assert proc.wait(timeout=120) == 0  # without the drain it would poll on forever
    finally:
        kill(proc)
    result = Result.from_json((root / JobPaths(first).result).read_bytes())
    assert result.state == JobState.succeeded and result.attempts == 1
    assert result.epochs_completed == 6
    assert (root / JobPaths(second).queued_manifest).is_file()
    assert not (root / JobPaths(second).dir).exists()  # never claimed: no attempt
    assert not (root / JobPaths(gpu_job).dir).exists()
    assert queue.worker_status("colab-1").capabilities.device == "cpu"
    assert queue.worker_status("colab-1").state == WorkerState.stopped
    assert not (root / layout.drain_request_path("colab-1")).exists()
    log = [json.loads(line) for line in (root / "worker-colab-1.log").read_text().splitlines()
           if line.startswith("{")]
    assert any(e.get("event", "").startswith("drain requested") and e["seen_in"] == "a heartbeat"
               for e in log)


def test_an_idle_drive_worker_sees_a_drain_in_its_poll_at_no_extra_request():
    """On a Drive API root an idle poll is one request (the listing of queue/): the drain
    request is in that listing, so watching for it costs nothing; the drained worker exits at
    the next poll after the request."""
    from cherry_train.testing.fakedrive import FakeDrive
    from cherry_train.testing.fakehttp import fake_drive_storage

    drive = FakeDrive()
    clock = FakeClock()
    queue = JobQueue(fake_drive_storage(drive), clock)
    queue.storage.write_atomic("queue/.keep", b"")
    client = JobQueue(fake_drive_storage(drive), clock)
    polls = []
    wait = clock.wait

    def counted_wait(stop, seconds):
        polls.append(len(drive.requests))
        if len(polls) == 12:  # a few steady 30 s polls, then `cherry drain` on a laptop
            request_drain(client, "idle")
            polls.append(len(drive.requests))
        return wait(stop, seconds)

    clock.wait = counted_wait
    worker = Worker(queue, WorkerIdentity("idle"), WorkerOptions(release_runtime=lambda: None))
    with structlog.testing.capture_logs() as logs:
        assert worker.run() == 0
    assert [x["reason"] for x in logs if x["event"] == "worker exiting"] == ["drained"]
    assert len(polls) == 13  # it left at the first poll after the request
    steady = [polls[i + 1] - polls[i] for i in range(6, 10)]
    assert steady and max(steady) <= 4  # a listing, and at most a status write
    assert min(steady) == 1  # a poll between status writes: the listing alone
    assert queue.worker_status("idle").state == WorkerState.stopped
    assert not client.storage.exists(layout.drain_request_path("idle"))
