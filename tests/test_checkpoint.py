"""Background checkpoint writes: training waits for a copy of the state, not for the disk."""

from __future__ import annotations

import threading

import pytest
import torch

from cherry_train.jobqueue.owner import Fenced
from cherry_train.jobqueue.protocol import JobQueue, WorkerIdentity
from cherry_train.schemas import validate_config
from cherry_train.storage import LocalStorage
from cherry_train.worker.checkpoint import Checkpoints, snapshot


@pytest.fixture
def owner(tmp_path, tiny_config):
    queue = JobQueue(LocalStorage(tmp_path / "root"))
    claim = queue.try_claim(queue.submit(validate_config(tiny_config)), WorkerIdentity("w"))
    return queue.owner(claim)


def test_snapshot_shares_nothing_with_the_live_state():
    live = {"w": torch.ones(3), "nested": [torch.zeros(2), {"n": 5}]}
    copy = snapshot(live)
    live["w"].add_(1)
    live["nested"][0].add_(1)
    live["nested"][1]["n"] = 6
    assert copy["w"].tolist() == [1, 1, 1] and copy["nested"][0].tolist() == [0, 0]
    assert copy["nested"][1]["n"] == 5


def test_save_returns_before_the_write_and_names_it_only_once_durable(owner, tmp_path,
                                                                      monkeypatch):
    release, durable = threading.Event(), []
    upload = owner.upload

    def slow_upload(local, path):
        release.wait(10)
        upload(local, path)

    monkeypatch.setattr(owner, "upload", slow_upload)
    checkpoints = Checkpoints(owner, tmp_path / "scratch", keep_last=2,
                              on_durable=lambda step, path: durable.append(step))
    checkpoints.save_in_background(5, {"w": torch.ones(4)})
    assert durable == [] and checkpoints.steps() == []  # training goes on meanwhile
    release.set()
    checkpoints.wait()
    assert durable == [5] and checkpoints.steps() == [5]
    step, payload = checkpoints.load_latest()
    assert step == 5 and payload["w"].tolist() == [1, 1, 1, 1]


def test_a_failed_write_stops_training_at_the_next_wait(owner, tmp_path, monkeypatch):
    def fenced(local, path):
        raise Fenced("attempt 2 took over")

    monkeypatch.setattr(owner, "upload", fenced)
    checkpoints = Checkpoints(owner, tmp_path / "scratch", keep_last=2)
    checkpoints.save_in_background(1, {"w": torch.ones(1)})
    with pytest.raises(Fenced):
        checkpoints.save_in_background(2, {"w": torch.ones(1)})  # waits for the first
    assert checkpoints.steps() == []
