"""A full Drive caught before a job starts (issue 27 item 4): the job's footprint against the
root's free space (about.get on the fake Drive with a small quota)."""

from __future__ import annotations

import structlog
from test_queue import config, fake_trainer

from cherry_train.jobqueue.claims import WorkerIdentity
from cherry_train.jobqueue.clock import FakeClock
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.testing.fakedrive import FakeDrive
from cherry_train.testing.fakehttp import fake_drive_storage
from cherry_train.worker import space
from cherry_train.worker.loop import Worker

MB = 1 << 20


def test_the_footprint_counts_kept_checkpoints_optimizer_state_weights_and_onnx(tiny_config):
    params = space.parameter_count("resnet18", 2)
    assert 11_000_000 < params < 12_000_000  # resnet18 with a 2-class head
    w = params * 4
    adam = config(tiny_config, export={"onnx": True})  # keep_last 2: + best + being written
    assert space.footprint(adam) == 4 * 3 * w + 2 * w + w
    sgd = config(tiny_config, training={**tiny_config["training"], "optimizer": "sgd"},
                 checkpoint={"keep_last": 5}, export={"onnx": False})
    assert space.footprint(sgd) == 7 * 2 * w + 2 * w


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_job_that_cannot_fit_stays_queued_said_once_and_taken_once_space_is_freed(
        tiny_config):
    drive = FakeDrive(quota_bytes=100 * MB)  # resnet18 with Adam needs about 700 MB
    queue = JobQueue(fake_drive_storage(drive), FakeClock())
    manifest = queue.submit(config(tiny_config))
    ran, clock = [], Clock()
    worker = Worker(queue, WorkerIdentity("w1"), trainer=fake_trainer(ran))
    worker.space = space.SpaceGate(queue.storage, monotonic=clock)
    with structlog.testing.capture_logs() as logs:
        for _ in range(5):
            assert worker.run_once() is False  # never claimed: no attempt, no crash loop
            clock.now += 30
    assert ran == [] and queue.attempts(manifest.job_id) == []
    said = [e for e in logs if e["event"].startswith("not starting a job that would not fit")]
    assert len(said) == 1 and "free space there" in said[0]["problem"]
    assert drive.count("GET", "/drive/v3/about") == 1  # no spinning on about.get either
    drive.quota_bytes = 2000 * MB  # space freed (or a bigger plan)
    clock.now += space.RECHECK_SECONDS
    assert worker.run_once() is True and ran == [manifest.job_id]


def test_unknown_free_space_never_stops_a_job(tiny_config):
    queue = JobQueue(fake_drive_storage(FakeDrive()), FakeClock())  # no quota: None
    queue.submit(config(tiny_config))
    ran = []
    assert Worker(queue, WorkerIdentity("w1"), trainer=fake_trainer(ran)).run_once()
    assert len(ran) == 1


def test_a_root_in_a_shared_drive_has_no_quota_of_the_users(tiny_config, monkeypatch):
    """about.get gives the user's own quota; a shared drive's files do not count against it.
    A nearly full My Drive must not hold back jobs whose root is in a shared drive."""
    from cherry_train.testing.fakedrive import FakeFile

    drive = FakeDrive(quota_bytes=1 * MB)  # the user's My Drive: full
    storage = fake_drive_storage(drive, folder="traina")
    storage.write_atomic("queue/.keep", b"")
    root_id = next(f.id for f in drive.files.values() if f.name == "traina")
    assert storage.free_bytes() is not None  # a path under My Drive: the user's quota
    meta = FakeFile.meta
    monkeypatch.setattr(FakeFile, "meta", lambda f: {**meta(f), **(
        {"driveId": "0Ashared"} if f.id == root_id else {})})
    shared = fake_drive_storage(drive, folder=f"id:{root_id}")
    assert shared.free_bytes() is None
    queue = JobQueue(shared, FakeClock())
    queue.submit(config(tiny_config))
    ran = []
    assert Worker(queue, WorkerIdentity("w1"), trainer=fake_trainer(ran)).run_once()
    assert len(ran) == 1


def test_sgd_without_momentum_keeps_no_optimizer_state(tiny_config):
    w = space.parameter_count("resnet18", 2) * 4
    plain = config(tiny_config, training={**tiny_config["training"], "optimizer": "sgd",
                                          "momentum": 0.0}, export={"onnx": False})
    assert space.footprint(plain) == 4 * w + 2 * w


def test_a_resumed_job_counts_the_checkpoints_it_already_stores(tiny_config, monkeypatch):
    monkeypatch.setattr(space, "parameter_count", lambda name, classes: 1000)
    need = space.footprint(config(tiny_config))  # 4 KB weights
    drive = FakeDrive()
    queue = JobQueue(fake_drive_storage(drive), FakeClock())
    manifest = queue.submit(config(tiny_config))
    stored = 3 * 4000  # one checkpoint of the job's earlier attempt
    queue.storage.write_atomic(f"done/{manifest.job_id}/checkpoints/step-000000010.pt",
                               b"c" * stored)
    used = sum(len(f.content) for f in drive.files.values())
    drive.quota_bytes = used + need - stored  # fits only with what it stores counted
    assert not space.SpaceGate(queue.storage).refuses(manifest)
    drive.quota_bytes -= 1
    assert space.SpaceGate(queue.storage).refuses(manifest)


def test_submit_to_a_drive_too_full_is_refused_in_one_line(monkeypatch, tmp_path, tiny_config,
                                                           capsys):
    import json

    from cherry_train.cli import main
    from cherry_train.testing.fakehttp import serve

    drive = FakeDrive(token="t", quota_bytes=100 * MB)
    server, endpoint = serve(drive)
    monkeypatch.setenv("CHERRY_DRIVE_ENDPOINT", endpoint)
    monkeypatch.setenv("CHERRY_DRIVE_TOKEN", "t")
    cfg = tmp_path / "job.yaml"
    cfg.write_text(json.dumps(tiny_config))
    try:
        assert main(["submit", str(cfg), "--root", "gdrive:traina", "--no-preflight"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("(Drive space): the job needs about")
        assert [f for f in drive.files.values() if f.name.endswith(".json")] == []  # not queued
        drive.quota_bytes = 2000 * MB
        assert main(["submit", str(cfg), "--root", "gdrive:traina", "--no-preflight"]) == 0
        # A laptop without torch cannot count the model: the job goes, the worker checks.
        monkeypatch.setattr(space, "parameter_count", _no_torch)
        drive.quota_bytes = 1 * MB
        assert main(["submit", str(cfg), "--root", "gdrive:traina", "--no-preflight"]) == 0
        assert len([f for f in drive.files.values() if f.name.endswith(".json") and
                    f.parents and drive.files[f.parents[0]].name == "queue"]) == 2
    finally:
        server.shutdown()


def _no_torch(name, classes):
    raise ImportError("No module named 'torch'")


def test_status_shows_the_roots_free_space(tmp_path, capsys):
    from cherry_train.cli import main

    (tmp_path / "root").mkdir()
    assert main(["status", "--root", str(tmp_path / "root")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"root: {tmp_path / 'root'} (") and first.endswith(" free)")
