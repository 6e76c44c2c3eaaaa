"""Fitting Colab: idle shutdown, the session cap, compute units (injected clock, fake hooks)."""

from __future__ import annotations

import sys
from datetime import timedelta

import pytest

from cherry_train.jobqueue.claims import WorkerIdentity
from cherry_train.jobqueue.clock import FakeClock
from cherry_train.jobqueue.layout import JobPaths
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.schemas import Heartbeat, validate_config
from cherry_train.storage import LocalStorage
from cherry_train.worker.checkpoints.state import TrainState
from cherry_train.worker.colabsession import compute_units
from cherry_train.worker.loop import Worker, WorkerOptions
from cherry_train.worker.outcome import Outcome


@pytest.fixture
def queue(fs):
    return JobQueue(LocalStorage("/root"), FakeClock())


def test_idle_shutdown_releases_the_runtime(queue):
    released = []
    options = WorkerOptions(idle_shutdown_minutes=10, release_runtime=lambda: released.append(1))
    worker = Worker(queue, WorkerIdentity("colab-1"), options)
    started = queue.clock.now()
    assert worker.run() == 0
    assert released == [1]
    idle = (queue.clock.now() - started).total_seconds()
    assert 600 <= idle < 600 + 31  # within one (backed-off) poll of the limit


def test_work_resets_the_idle_timer(queue, tiny_config):
    released, ran = [], []

    def trainer(run):
        ran.append(queue.clock.now())
        queue.clock.advance(3600)  # an hour of training is not idle time
        return Outcome(completed=True, state=TrainState(epoch=2), device="fake",
                       precision="off", threads=1)

    queue.submit(validate_config(tiny_config))
    worker = Worker(queue, WorkerIdentity("w"), WorkerOptions(
        idle_shutdown_minutes=10, release_runtime=lambda: released.append(queue.clock.now())),
        trainer=trainer)
    worker.run()
    assert len(ran) == 1 and len(released) == 1
    assert (released[0] - ran[0]).total_seconds() >= 3600 + 600


def test_a_job_that_cannot_reach_a_checkpoint_before_the_cap_is_not_started(queue,
                                                                           tiny_config):
    tiny_config["checkpoint"] = {"every_minutes": 30}
    slow = queue.submit(validate_config(tiny_config))
    ran = []
    trainer = lambda run: ran.append(run.claim.job_id)  # noqa: E731
    worker = Worker(queue, WorkerIdentity("w"), WorkerOptions(max_runtime_hours=0.5),
                    trainer=trainer)  # 30 min left < 5 setup + 30 to a checkpoint + 5 margin
    assert worker.run() == 0
    assert ran == [] and worker.cap_reached
    assert queue.storage.list_dir("queue") == [f"{slow.job_id}.json"]  # left for a fresh VM


def test_near_the_cap_a_running_job_is_checkpointed_and_handed_back(queue, tiny_config):
    tiny_config["checkpoint"] = {"every_minutes": 5}
    manifest = queue.submit(validate_config(tiny_config))
    seen = []

    def trainer(run):
        reporter, stop = run.reporter, run.stop
        queue.clock.advance(56 * 60)  # past the cap less the 5-minute margin to checkpoint
        reporter.beat()
        seen.append(stop.reason)
        return Outcome(completed=False, state=TrainState(global_step=7), device="fake",
                       precision="off", threads=1)

    worker = Worker(queue, WorkerIdentity("w"), WorkerOptions(max_runtime_hours=1),
                    trainer=trainer)
    assert worker.run() == 0
    assert seen == ["max-runtime"]
    assert worker.stop.reason == "max-runtime"  # the worker stops too: its runtime is ending
    hb = Heartbeat.from_json(queue.storage.read_bytes(JobPaths(manifest.job_id).heartbeat))
    assert hb.released  # the next worker may take it at once
    assert not queue.storage.exists(JobPaths(manifest.job_id).result)


@pytest.mark.parametrize(("device", "hours", "expected"), [
    ("Tesla T4", 2.0, 3.6),
    ("NVIDIA A100-SXM4-40GB", 0.5, 5.9),
    ("NVIDIA L4", 1.0, 4.8),
    ("NVIDIA H200", 1.0, None),  # no rate known: no guess
    ("CPU (2 threads)", 1.0, None),
    ("Tesla T4", 0.0, None),
])
def test_compute_units(device, hours, expected):
    assert compute_units(device, hours) == expected


def test_compute_unit_rates_can_be_overridden(monkeypatch):
    monkeypatch.setenv("CHERRY_CU_RATES", '{"H200": 20, "T4": 2}')
    assert compute_units("NVIDIA H200", 0.5) == 10
    assert compute_units("Tesla T4", 1) == 2


def test_worker_rejects_nonsense_durations(capsys):
    from cherry_train.cli import main

    with pytest.raises(SystemExit) as info:
        main(["worker", "--idle-shutdown", "0"])
    assert info.value.code == 2
    assert "--idle-shutdown" in capsys.readouterr().err


def test_the_session_cap_counts_from_the_vms_start(queue, monkeypatch):
    """On Colab the cap runs from the VM's boot (its uptime), computed once: a worker started
    late in a session has less time, and the deadline does not drift as uptime grows."""
    from cherry_train.worker import colabsession

    uptime = {"s": 3600.0}
    monkeypatch.setattr(colabsession, "runtime_started_at",
                        lambda now: now - timedelta(seconds=uptime["s"]))
    worker = Worker(queue, WorkerIdentity("w"), WorkerOptions(max_runtime_hours=2))
    first = worker._budget().ends_at
    uptime["s"] = 7000.0  # later calls see a larger uptime
    assert worker._budget().ends_at == first
    assert (first - worker.started_at).total_seconds() == 3600  # 2 h cap, 1 h already gone


def test_an_idle_worker_says_it_waits_now_and_then(queue):
    from structlog.testing import capture_logs

    options = WorkerOptions(idle_shutdown_minutes=12, release_runtime=lambda: None)
    with capture_logs() as events:
        Worker(queue, WorkerIdentity("colab-1"), options).run()
    waiting = [e for e in events if e["event"] == "waiting for jobs"]
    assert [round(e["idle_minutes"]) for e in waiting] == [0, 5, 10]  # at once, then every 5
    assert "cherry submit" in waiting[0]["hint"]


@pytest.mark.parametrize(("tty", "expected"), [(True, "console"), (False, "json")])
def test_logs_are_for_people_in_a_terminal_and_json_in_a_pipe(monkeypatch, tty, expected):
    import io
    import sys

    from cherry_train import logs

    class Stream(io.StringIO):
        def isatty(self):
            return tty

    monkeypatch.setattr(sys, "stderr", Stream())
    assert logs.resolve_format("auto") == expected
    assert logs.resolve_format("json") == "json"


def test_log_lines_go_above_a_progress_bar_not_into_it(capsys):
    import structlog
    from tqdm import tqdm

    from cherry_train import logs

    logs.configure("console", "info")
    try:
        bar = tqdm(total=10, desc="epoch 1/2", file=sys.stderr, ascii=True)
        bar.update(3)
        structlog.get_logger("t").info("checkpoint written", step=3)
        bar.close()
    finally:
        logs.configure("console", "info")
    err = capsys.readouterr().err
    line = next(x for x in err.replace("\r", "\n").splitlines() if "checkpoint written" in x)
    assert "epoch 1/2" not in line  # on a line of its own, not glued to the bar
