"""A stop ends the worker promptly in any phase, whatever the queue root does: real worker
processes on a Drive API root whose Drive stops answering, signalled as Colab, `timeout` or
Ctrl-C signal them; and the waits that make it so (the back-off helper, the idle poll)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cherry_train.backoff import STOPPING, Stopped, Stopping
from cherry_train.jobqueue.claims import WorkerIdentity
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.schemas import WorkerState
from cherry_train.storage import LocalStorage, RetryingStorage
from cherry_train.storage.confirmed import UploadConfirmedMount
from cherry_train.testing.fakedrive import FakeDrive
from cherry_train.testing.fakehttp import serve
from cherry_train.worker.loop import Worker, WorkerOptions
from cherry_train.worker.signals import StopRequest, stop_on_signals, within

TOKEN = "ya29.token-for-the-fake"


class FlakyDrive:
    """The fake Drive, until `fail()`: then every request hangs (no answer, as when the network
    drops packets) or gets 503 (as when Drive is down)."""

    def __init__(self):
        self.drive = FakeDrive(token=TOKEN)
        self.mode: str | None = None
        self.failed = 0  # requests that met the outage
        self.released = threading.Event()  # lets hung requests go when the test ends

    def fail(self, mode: str) -> None:
        self.mode = mode

    def handle(self, method, uri, headers, body):
        if self.mode is None:
            return self.drive.handle(method, uri, headers, body)
        self.failed += 1
        if self.mode == "hang":
            self.released.wait()
        payload = (b'{"error": {"code": 503, "message": "backendError", "errors": '
                   b'[{"reason": "backendError", "message": "backendError"}]}}')
        return 503, {"content-type": "application/json"}, payload


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def start_worker(endpoint: str, log: Path, worker_id: str = "w1") -> subprocess.Popen:
    env = {**os.environ, "CHERRY_DRIVE_ENDPOINT": endpoint, "CHERRY_DRIVE_TOKEN": TOKEN,
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "cherry_train", "worker", "--root", "gdrive:traina",
           "--worker-id", worker_id, "--poll-seconds", "1", "--log-format", "console"]
    with open(log, "ab") as out:
        # Its own process group, as Colab, systemd or a terminal runs it: the signal goes to
        # the whole group.
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


@pytest.mark.slow
# Each waits out the worker's real bounds (30-35 s). The default run keeps the Drive that stops
# answering; the one that answers 503 (the back-off waking on the stop, which the unit test
# below also holds) runs with -m long.
@pytest.mark.parametrize("outage", [pytest.param("errors", marks=pytest.mark.long), "hang"])
def test_a_stop_during_a_drive_outage_ends_the_idle_worker(tmp_path, monkeypatch, outage):
    flaky = FlakyDrive()
    server, endpoint = serve(flaky)  # type: ignore[arg-type]
    monkeypatch.setenv("CHERRY_DRIVE_ENDPOINT", endpoint)
    monkeypatch.setenv("CHERRY_DRIVE_TOKEN", TOKEN)
    from cherry_train.storage import open_storage

    open_storage("gdrive:traina").write_atomic("queue/.keep", b"")  # the root exists
    log = tmp_path / "worker.log"
    proc = start_worker(endpoint, log)
    try:
        wait_for(lambda: "waiting for jobs" in log.read_text(), 120, "the worker to be idle")
        flaky.fail(outage)
        # The worker is inside a failing Drive request (hung, or in its back-off) now.
        wait_for(lambda: flaky.failed >= 2 or (outage == "hang" and flaky.failed), 30,
                 "the worker to meet the outage")
        time.sleep(1.0)
        signalled = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            rc = proc.wait(timeout=90)  # before the fix: 5 minutes of retries, then 5 more...
        except subprocess.TimeoutExpired:
            pytest.fail("the worker did not stop within 90 s of SIGTERM:\n" + log.read_text())
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        flaky.released.set()
        server.shutdown()
    text = log.read_text()
    assert took < 60, (took, text)
    assert "stop requested: exiting within 35 s at the most" in text, text
    if outage == "errors":
        # The poll's retries woke on the stop; the final status had its bounded while.
        assert rc == 0, text
        assert "stopping: writing the final status (giving up after 30 s)" in text, text
        assert "gave up on the final status" in text, text
        assert "the queue root cannot be reached; trying again" not in text, text
    else:
        # Stuck inside a request that never answers: the worker cuts it short, as a second
        # signal would, and says so.
        assert rc == 130, text
        assert "stopping took longer than" in text, text


# -- the waits: each wakes on the stop --------------------------------------------------------

@pytest.fixture
def signal_soon():
    """Send this process SIGTERM in `after` seconds, as Colab or Ctrl-C would."""
    timers = []

    def soon(after: float = 0.5) -> None:
        timer = threading.Timer(after, os.kill, (os.getpid(), signal.SIGTERM))
        timers.append(timer)
        timer.start()

    yield soon
    for timer in timers:
        timer.cancel()
    assert not STOPPING.is_set()  # the stop ends with the worker: a notebook kernel goes on


class Unreachable(LocalStorage):
    """A mount that answers EIO to everything, for as long as a test likes."""

    def read_bytes(self, path):
        raise OSError(errno.EIO, "Input/output error")


def test_a_stop_wakes_a_storage_retry_at_once(tmp_path, signal_soon):
    # Its retries would go on for 10 s (5 minutes by default) before the error is raised.
    storage = RetryingStorage(Unreachable(tmp_path), give_up_seconds=10)
    stop = StopRequest()
    with stop_on_signals(stop, is_busy=lambda: False):
        signal_soon()
        started = time.monotonic()
        with pytest.raises(Stopped):
            storage.read_bytes("queue/x.json")
        assert time.monotonic() - started < 3
    assert stop.reason == "SIGTERM"


def test_the_stop_allows_a_bounded_while_then_waits_give_up():
    stopping = Stopping()
    stopping.sleep(0.01)  # not stopping: an ordinary sleep
    stopping.request(grace=0.5)  # a job is checkpointed and handed back meanwhile
    stopping.sleep(0.1)
    started = time.monotonic()
    with pytest.raises(Stopped):
        stopping.sleep(30)  # goes on to the end of the while, not past it
    assert 0.2 < time.monotonic() - started < 2
    with stopping.allow(0.3):  # the final status's while
        stopping.sleep(0.1)
        with pytest.raises(Stopped):
            stopping.sleep(30)
    with pytest.raises(Stopped):
        stopping.sleep(0.01)  # the while is over: at once


def test_a_stop_wakes_the_idle_poll_at_once(tmp_path, signal_soon):
    queue = JobQueue(LocalStorage(tmp_path))
    options = WorkerOptions(poll_min_seconds=60, poll_max_seconds=60)
    worker = Worker(queue, WorkerIdentity("w1"), options)
    signal_soon(1.0)
    started = time.monotonic()
    assert worker.run() == 0
    assert time.monotonic() - started < 10
    assert queue.worker_status("w1").state == WorkerState.stopped


def test_a_stop_wakes_the_wait_for_an_upload_confirmation(tmp_path, signal_soon):
    class NeverThere:
        def md5(self, path):
            return None  # Drive has not received it (yet)

    mount = UploadConfirmedMount(tmp_path, NeverThere(), timeout=20)  # 15 minutes by default
    mount.write_atomic("done/j/checkpoints/step-1.pt", b"weights")
    with stop_on_signals(StopRequest(), is_busy=lambda: False):
        signal_soon()
        started = time.monotonic()
        assert mount.confirm_durable("done/j/checkpoints/step-1.pt") is False
        assert time.monotonic() - started < 5


def test_a_write_that_never_answers_is_given_up_at_its_bound():
    hung = threading.Event()
    started = time.monotonic()
    assert within(0.5, hung.wait) is False
    assert time.monotonic() - started < 3
    hung.set()
    assert within(5, lambda: None) is True
    with pytest.raises(OSError):
        within(5, lambda: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
