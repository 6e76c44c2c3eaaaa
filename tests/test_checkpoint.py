"""Background checkpoint writes: training waits for a copy of the state, not for the disk."""

from __future__ import annotations

import errno
import threading

import pytest
import torch

from cherry_train.jobqueue.claims import WorkerIdentity
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.jobqueue.owner import Fenced
from cherry_train.schemas import validate_config
from cherry_train.storage import LocalStorage
from cherry_train.worker.checkpoints.store import Checkpoints, StateCopier


@pytest.fixture
def owner(tmp_path, tiny_config):
    queue = JobQueue(LocalStorage(tmp_path / "root"))
    claim = queue.try_claim(queue.submit(validate_config(tiny_config)), WorkerIdentity("w"))
    return queue.owner(claim)


def take_over(owner):
    """Attempt 2 of the owner's job exists: the lease ran out and another worker claimed it."""
    paths = owner.claim.paths
    owner.queue.storage.write_atomic(paths.attempt(2), owner.claim.attempt.model_copy(
        update={"n": 2, "worker_id": "w2"}).to_json())


def test_the_copy_shares_nothing_with_the_live_state():
    live = {"w": torch.ones(3), "nested": [torch.zeros(2), {"n": 5}]}
    copy = StateCopier().copy(live).wait()
    live["w"].add_(1)
    live["nested"][0].add_(1)
    live["nested"][1]["n"] = 6
    assert copy["w"].tolist() == [1, 1, 1] and copy["nested"][0].tolist() == [0, 0]
    assert copy["nested"][1]["n"] == 5


def test_save_returns_before_the_write_and_names_it_only_once_durable(owner, tmp_path,
                                                                      monkeypatch):
    release, durable = threading.Event(), []
    upload = owner.upload

    def slow_upload(local, path, sha256=None):
        release.wait(10)
        upload(local, path, sha256)

    monkeypatch.setattr(owner, "upload", slow_upload)
    checkpoints = Checkpoints(owner, tmp_path / "scratch", keep_last=2,
                              on_durable=lambda step, path: durable.append(step))
    checkpoints.save_in_background(5, lambda: {"w": torch.ones(4)})
    assert durable == [] and checkpoints.steps() == []  # training goes on meanwhile
    release.set()
    checkpoints.wait()
    assert durable == [5] and checkpoints.steps() == [5]
    step, payload = checkpoints.load_latest()
    assert step == 5 and payload["w"].tolist() == [1, 1, 1, 1]


def test_a_failed_write_stops_training_at_the_next_wait(owner, tmp_path, monkeypatch):
    def fenced(local, path, sha256=None):
        raise Fenced("attempt 2 took over")

    monkeypatch.setattr(owner, "upload", fenced)
    checkpoints = Checkpoints(owner, tmp_path / "scratch", keep_last=2)
    checkpoints.save_in_background(1, lambda: {"w": torch.ones(1)})
    with pytest.raises(Fenced):
        checkpoints.save_in_background(2, lambda: {"w": torch.ones(1)})  # waits for the first
    assert checkpoints.steps() == []


def test_a_write_that_fails_for_want_of_space_lets_training_go_on(owner, tmp_path, monkeypatch):
    """Drive full (or a mount down past its retries): the state is still in memory, so the
    failure is reported and the next checkpoint tries again; nothing half-written is left."""
    upload, failing = owner.upload, [True]

    def full(local, path, sha256=None):
        if failing[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        upload(local, path, sha256)

    monkeypatch.setattr(owner, "upload", full)
    failed, durable = [], []
    checkpoints = Checkpoints(owner, tmp_path / "scratch", keep_last=2,
                              on_durable=lambda step, path: durable.append(step),
                              on_failed=lambda step, error: failed.append((step, error)))
    checkpoints.save_in_background(1, lambda: {"w": torch.ones(1)})
    checkpoints.wait()  # does not raise
    assert failed == [(1, "OSError: [Errno 28] No space left on device")]
    assert durable == [] and checkpoints.steps() == []
    assert list((tmp_path / "scratch").iterdir()) == []  # the partial file is gone
    failing[0] = False
    checkpoints.save_in_background(2, lambda: {"w": torch.ones(1)})
    checkpoints.wait()
    assert durable == [2] and checkpoints.steps() == [2] and len(failed) == 1


class FakeApi:
    """The Drive API's view of the mount's folder: a file appears once 'uploaded'."""

    def __init__(self, storage):
        self.storage, self.uploaded = storage, set()

    def md5(self, path):
        import hashlib

        if path not in self.uploaded:
            return None
        return hashlib.md5(self.storage.read_bytes(path)).hexdigest()


@pytest.fixture
def mount_owner(tmp_path, tiny_config):
    from cherry_train.storage.confirmed import UploadConfirmedMount

    waits = []
    storage = UploadConfirmedMount(tmp_path / "mount", None, timeout=60, sleep=waits.append,
                                   monotonic=lambda: float(len(waits)))
    storage.api = FakeApi(storage)
    queue = JobQueue(storage)
    claim = queue.try_claim(queue.submit(validate_config(tiny_config)), WorkerIdentity("w"))
    return queue.owner(claim)


def test_on_a_mount_a_checkpoint_counts_only_once_drive_has_it(mount_owner, tmp_path):
    storage, durable = mount_owner.queue.storage, []
    checkpoints = Checkpoints(mount_owner, tmp_path / "scratch", keep_last=1,
                              on_durable=lambda step, path: durable.append(step))
    paths = mount_owner.claim.paths
    storage.api.uploaded |= {paths.checkpoint(1), paths.checkpoint_checksum(1)}
    checkpoints.save_in_background(1, lambda: {"w": torch.ones(2)})
    checkpoints.wait()
    assert durable == [1]
    checkpoints.save_in_background(2, lambda: {"w": torch.ones(2)})  # never reaches Drive
    checkpoints.wait()
    assert durable == [1]  # the heartbeat keeps naming step 1
    assert checkpoints.steps() == [1, 2]  # and step 1 is not pruned for keep_last=1
    storage.api.uploaded |= {paths.checkpoint(3), paths.checkpoint_checksum(3)}
    checkpoints.save_in_background(3, lambda: {"w": torch.ones(2)})
    checkpoints.wait()
    assert durable == [1, 3] and checkpoints.steps() == [3]


def test_confirmation_compares_content_not_just_names(mount_owner):
    storage = mount_owner.queue.storage
    storage.write_atomic("x.bin", b"local")
    storage.api.md5 = lambda path: "0" * 32  # Drive holds an older version
    assert storage.confirm_durable("x.bin", timeout=10) is False
    storage.api = FakeApi(storage)
    storage.api.uploaded.add("x.bin")
    assert storage.confirm_durable("x.bin") is True


def test_confirm_uploads_needs_a_folder_inside_my_drive(tmp_path, monkeypatch):
    from cherry_train.storage.confirmed import open_confirmed_mount

    my_drive = tmp_path / "My Drive"
    (my_drive / "traina").mkdir(parents=True)
    monkeypatch.setenv("CHERRY_MYDRIVE", str(my_drive))
    opened = []
    storage = open_confirmed_mount(str(my_drive / "traina"), api_factory=opened.append)
    assert opened == ["traina"] and storage.confirms_later
    with pytest.raises(ValueError, match="not a folder inside My Drive"):
        open_confirmed_mount(str(tmp_path / "elsewhere"), api_factory=opened.append)


def test_the_next_state_is_collected_after_the_previous_write(owner, tmp_path):
    # before_write runs on the writer thread, on the copied state, before the checkpoint is
    # published; what it changes (the best weights' hash) is in the next collected state.
    live = {"w": torch.ones(2), "note": None}
    checkpoints = Checkpoints(owner, tmp_path / "scratch", keep_last=5)
    seen = []

    def before_write(payload):
        seen.append((payload["note"], payload["w"].tolist(), checkpoints.steps()))
        live["note"] = f"written after step {len(seen)}"

    checkpoints.save_in_background(1, lambda: dict(live), before_write)
    live["w"].add_(1)  # training goes on: the copy already taken is not affected
    checkpoints.save_in_background(2, lambda: dict(live), before_write)
    checkpoints.wait()
    assert seen == [(None, [1.0, 1.0], []), ("written after step 1", [2.0, 2.0], [1])]
    assert checkpoints.load_latest()[1]["note"] == "written after step 1"


def test_metrics_are_never_overwritten_by_an_older_snapshot(owner, monkeypatch):
    # The heartbeat thread and the checkpoint thread both sync metrics.jsonl. A slow write of
    # an older snapshot must not land after a newer one (a resume would lose lines).
    from datetime import UTC, datetime

    from cherry_train.schemas import WorkerStatus
    from cherry_train.worker.reporting.reporter import Reporter
    from cherry_train.worker.signals import StopRequest

    status = WorkerStatus(worker_id="w", incarnation="i", at=datetime.now(UTC), state="busy")
    reporter = Reporter(owner, status, StopRequest(),
                        interval=owner.claim.manifest.config.heartbeat_seconds)
    entered, release, write = threading.Event(), threading.Event(), owner.write

    def slow_first_write(path, data):
        if not entered.is_set():
            entered.set()
            release.wait(10)
        write(path, data)

    monkeypatch.setattr(owner, "write", slow_first_write)
    reporter.metric({"kind": "train", "step": 1})
    first = threading.Thread(target=reporter.sync_metrics)
    first.start()
    entered.wait(10)
    reporter.metric({"kind": "train", "step": 2})
    second = threading.Thread(target=reporter.sync_metrics)
    second.start()
    second.join(0.3)  # without one writer at a time, the newer snapshot is written now
    release.set()
    first.join()
    second.join()
    lines = owner.queue.storage.read_text_or_none(owner.claim.paths.metrics).splitlines()
    assert len(lines) == 2


def test_a_stale_attempts_prune_is_fenced_and_removes_nothing(owner, tmp_path, tiny_config):
    """Checkpoints write and delete only through the owner: after a takeover, the old
    attempt's pruning raises Fenced instead of removing the new owner's checkpoints."""
    queue, paths = owner.queue, owner.claim.paths
    stale = Checkpoints(owner, tmp_path / "scratch-old", keep_last=1)
    stale.save(5, {"w": torch.ones(2)})
    take_over(owner)  # and attempt 2 writes its own checkpoints
    for step in (10, 12):
        queue.storage.write_atomic(paths.checkpoint(step), b"new owner's")
        queue.storage.write_atomic(paths.checkpoint_checksum(step), b"sum")
    with pytest.raises(Fenced):
        stale.prune()
    assert set(stale.steps()) == {5, 10, 12}
    with pytest.raises(AttributeError, match="read-only"):
        stale.storage.delete(paths.checkpoint(10))  # no raw write path to reach for


def test_a_stale_attempts_checkpoint_upload_is_fenced_and_writes_nothing(owner, tmp_path):
    """The upload itself is fenced, not only the checksum written after it: a stale attempt
    must not put its checkpoint file beside the new owner's (nor over one of the same step)."""
    paths = owner.claim.paths
    take_over(owner)
    stale = Checkpoints(owner, tmp_path / "scratch-old", keep_last=2)
    with pytest.raises(Fenced):
        stale.save(7, {"w": torch.ones(2)})
    assert not owner.queue.storage.exists(paths.checkpoint(7))
    assert owner.queue.storage.list_dir(paths.checkpoints_dir) == []


def test_a_checkpoint_that_loads_but_whose_bytes_changed_is_not_resumed_from(owner, tmp_path):
    """The checksum, not torch.load failing, keeps a changed checkpoint out of a resume: here
    the newest is replaced by another valid checkpoint (a bit flip inside a tensor, a file
    from elsewhere), which loads fine. The one before it is resumed from; the changed one goes."""
    paths, storage = owner.claim.paths, owner.queue.storage
    checkpoints = Checkpoints(owner, tmp_path / "scratch", keep_last=5)
    checkpoints.save(1, {"w": torch.ones(2)})
    checkpoints.save(2, {"w": torch.full((2,), 2.0)})
    changed = tmp_path / "changed.pt"
    torch.save({"w": torch.full((2,), 666.0)}, changed)
    storage.write_atomic(paths.checkpoint(2), changed.read_bytes())
    assert torch.load(tmp_path / "root" / paths.checkpoint(2), weights_only=True)["w"][0] == 666
    step, payload = checkpoints.load_latest()
    assert step == 1 and payload["w"].tolist() == [1.0, 1.0]
    assert checkpoints.steps() == [1]


def test_curves_that_cannot_be_stored_do_not_end_the_job(owner, monkeypatch):
    """A picture is not worth a job: a permanent write error on curves.png is logged, and the
    reporter (training) goes on; fencing still stops it."""
    from cherry_train.schemas import WorkerStatus
    from cherry_train.worker.reporting.reporter import Reporter
    from cherry_train.worker.signals import StopRequest

    status = WorkerStatus(worker_id="w", incarnation="i", at=owner.clock.now(), state="busy")
    reporter = Reporter(owner, status, StopRequest(),
                        interval=owner.claim.manifest.config.heartbeat_seconds)
    reporter.metric({"kind": "epoch", "epoch": 1, "step": 1, "train_loss": 1.0,
                     "train_accuracy": 0.5, "val_loss": 1.0, "val_accuracy": 0.5})
    write = owner.write

    def refuse_curves(path, data):
        if path.endswith("curves.png"):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        write(path, data)

    monkeypatch.setattr(owner, "write", refuse_curves)
    reporter.write_curves("job")  # logged, not raised
    monkeypatch.setattr(owner, "write", lambda path, data: (_ for _ in ()).throw(Fenced("2")))
    with pytest.raises(Fenced):
        reporter.write_curves("job")
    assert reporter.stop.reason == "fenced"
