"""The worker's scratch in a shared temp folder: this user's alone (0700), never a folder or link
someone else put under the name it uses."""

from __future__ import annotations

import os
import stat
import tempfile

import pytest
from structlog.testing import capture_logs

from cherry_train.cli import main
from cherry_train.jobqueue.claims import WorkerIdentity
from cherry_train.worker.scratch import Scratch, UnsafeScratch


@pytest.fixture
def shared_tmp(tmp_path, monkeypatch):
    """A temp folder like /tmp: everyone may create names in it."""
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    return shared


def scratch() -> Scratch:
    return Scratch(None, "local folder /r", WorkerIdentity("w1"))


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_scratch_is_a_per_user_folder_only_its_user_can_enter(shared_tmp):
    """It was <tmp>/cherry-train-scratch with the default permissions (0755 under the usual
    umask): anyone on the machine could read the checkpoints in it."""
    old = os.umask(0o022)
    try:
        job = scratch().for_job("20261126-101500-a-7f3a")
    finally:
        os.umask(old)
    top = shared_tmp / f"cherry-train-scratch-{os.getuid()}"
    assert job.is_relative_to(top) and mode(top) == 0o700
    assert os.lstat(top).st_uid == os.getuid()


def test_our_own_folder_with_loose_permissions_is_made_private(shared_tmp):
    top = shared_tmp / f"cherry-train-scratch-{os.getuid()}"
    top.mkdir()
    top.chmod(0o777)
    with capture_logs() as logs:
        scratch().clear_dead()
    assert mode(top) == 0o700
    assert [e["event"] for e in logs] == ["scratch folder was open to others; made private (0700)"]


def test_a_link_or_someone_elses_folder_under_that_name_is_refused(shared_tmp, tmp_path,
                                                                   monkeypatch, capsys):
    """Someone who made the name first would read every checkpoint (their folder), or have
    them written where they like (a link): the worker refuses to start, in one line."""
    top = shared_tmp / f"cherry-train-scratch-{os.getuid()}"
    elsewhere = tmp_path / "attacker"
    elsewhere.mkdir()
    top.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UnsafeScratch, match="not a folder of yours"):
        scratch().for_job("j")
    (tmp_path / "root").mkdir()
    assert main(["worker", "--root", str(tmp_path / "root"), "--exit-when-idle",
                 "--worker-id", "w1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: scratch folder {top} is not a folder of yours")
    assert not list(elsewhere.iterdir())
    top.unlink()
    real = os.getuid()
    top = shared_tmp / f"cherry-train-scratch-{real + 1}"
    top.mkdir(mode=0o700)  # ours, but under the name of another uid: as if theirs
    monkeypatch.setattr(os, "getuid", lambda: real + 1)
    with pytest.raises(UnsafeScratch, match=f"belongs to uid {real}, not to you"):
        scratch().for_job("j")
    assert not list(top.iterdir())
