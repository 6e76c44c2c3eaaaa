"""One contract, every backend: the primitives the queue protocol relies on.

Each backend gets a fixture in `storage`. The local folder runs three times: on a real
directory, under pyfakefs, and failing like a flaky Drive mount (Errno 107 / EIO on 30% of calls,
half of them after the operation took effect) behind the retry wrapper. The Drive API backend
runs twice, through the real google-api-python-client against the stateful fake Drive v3: as
it is, and with 30% of requests failing (429/500/503/403 rate limit, or the response dropped
after the server acted). With CHERRY_LIVE_DRIVE_ROOT set, `pytest -m live` runs it against a
real Drive folder too.
"""

from __future__ import annotations

import errno
import time

import pytest
from concurrently import at_once
from flaky import FlakyStorage

from cherry_train.files import TMP_MARK
from cherry_train.storage import LocalStorage, RetryingStorage, Storage


@pytest.fixture(params=["local", "local-fakefs", "flaky-mount-with-retries", "drive-api",
                        "drive-api-30pct-faults",
                        pytest.param("drive-live", marks=pytest.mark.live)])
def storage(request, tmp_path) -> Storage:
    if request.param == "drive-live":  # a real Drive: see tests/test_gdrive_live.py
        return request.getfixturevalue("live_folder")
    if request.param.startswith("drive-api"):
        from cherry_train.testing.fakedrive import FakeDrive
        from cherry_train.testing.fakehttp import fake_drive_storage

        drive = FakeDrive(page_size_cap=2)  # every listing of 3+ entries takes several pages
        rate = 0.3 if request.param.endswith("faults") else 0.0
        return fake_drive_storage(drive, fault_rate=rate, seed=7)
    if request.param == "local-fakefs":
        request.getfixturevalue("fs")
        tmp_path.mkdir(parents=True, exist_ok=True)
    if request.param == "flaky-mount-with-retries":
        return RetryingStorage(FlakyStorage(tmp_path / "root", rate=0.3), sleep=lambda s: None)
    return LocalStorage(tmp_path / "root")


def test_read_missing_raises(storage):
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("queue/nope.json")


def test_write_atomic_creates_parents_and_replaces(storage):
    storage.write_atomic("a/b/c.json", b"one")
    storage.write_atomic("a/b/c.json", b"two")
    assert storage.read_bytes("a/b/c.json") == b"two"
    assert storage.list_dir("a/b") == ["c.json"]  # no temp files left behind


def test_create_exclusive_only_once(storage):
    assert storage.create_exclusive("done/j/attempts/1.json", b"first") is True
    assert storage.create_exclusive("done/j/attempts/1.json", b"second") is False
    assert storage.read_bytes("done/j/attempts/1.json") == b"first"


def test_create_exclusive_has_one_winner_among_threads(storage):
    wins = []

    def claim(i, _):
        if storage.create_exclusive("x/result.json", f"{i}".encode()):
            wins.append(i)

    at_once(8, claim)
    assert len(wins) == 1
    assert storage.read_bytes("x/result.json") == str(wins[0]).encode()


def test_list_dir_is_sorted_and_missing_is_empty(storage):
    assert storage.list_dir("queue") == []
    for name in ("b.json", "a.json", "c.json"):
        storage.write_atomic(f"queue/{name}", b"{}")
    assert storage.list_dir("queue") == ["a.json", "b.json", "c.json"]


def test_stat(storage):
    assert storage.stat("f") is None
    storage.write_atomic("f", b"12345")
    info = storage.stat("f")
    assert info.size == 5 and info.modified.tzinfo is not None
    assert storage.exists("f")


def test_stat_in_subfolders(storage):
    """Each job folder's result.json, found in one go (status checks its cached rows with it)."""
    for job in ("a", "b", "c"):
        storage.write_atomic(f"done/{job}/heartbeat.json", b"{}")
    storage.write_atomic("done/a/result.json", b"12345")
    storage.write_atomic("done/c/result.json", b"1")
    storage.write_atomic("done/b/sub/result.json", b"deeper: not b's")
    storage.write_atomic("done/result.json", b"not in a subfolder")
    found = storage.stat_in_subfolders("done", "result.json")
    assert {k: v.size for k, v in found.items()} == {"a": 5, "c": 1}
    assert found["a"] == storage.stat("done/a/result.json")
    assert storage.stat_in_subfolders("nothing-here", "result.json") == {}


def test_move_replaces_and_missing_source_raises(storage):
    storage.write_atomic("queue/j.json", b"manifest")
    storage.write_atomic("done/j/manifest.json", b"old")
    storage.move("queue/j.json", "done/j/manifest.json")
    assert storage.read_bytes("done/j/manifest.json") == b"manifest"
    assert not storage.exists("queue/j.json")
    with pytest.raises(FileNotFoundError):
        storage.move("queue/j.json", "failed/j.json")


def test_delete_file_folder_and_missing(storage):
    storage.write_atomic("d/x/1", b"1")
    storage.write_atomic("d/2", b"2")
    storage.delete("d/2")
    storage.delete("d/2")  # missing: no error
    storage.delete("d/x")
    assert storage.list_dir("d") == []


def test_upload_and_download_round_trip(storage, tmp_path):
    src = tmp_path / "big.bin"
    payload = bytes(range(256)) * 4096
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(payload)
    storage.upload(src, "done/j/checkpoints/step-000000001.pt")
    assert src.read_bytes() == payload  # left in place: an upload can be repeated
    out = tmp_path / "back" / "copy.bin"
    storage.download("done/j/checkpoints/step-000000001.pt", out)
    assert out.read_bytes() == payload
    assert storage.list_dir("done/j/checkpoints") == ["step-000000001.pt"]


def test_paths_cannot_leave_the_root(storage):
    with pytest.raises(ValueError):
        storage.write_atomic("../outside.json", b"x")


class FailsFirst(LocalStorage):
    """The mount reconnecting: the first `n` calls fail with Errno 107, then all is well."""

    def __init__(self, root, n: int):
        super().__init__(root)
        self.left = n

    def write_atomic(self, path: str, data: bytes) -> None:
        if self.left > 0:
            self.left -= 1
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")
        super().write_atomic(path, data)


def test_transient_errors_are_retried_with_growing_waits(tmp_path):
    waits = []
    storage = RetryingStorage(FailsFirst(tmp_path, n=4), sleep=waits.append)
    storage.write_atomic("x", b"1")  # the fifth try goes through
    assert storage.read_bytes("x") == b"1"
    assert len(waits) == 4
    assert waits[-1] > waits[0] and all(w <= 30.5 for w in waits)  # backing off, capped


def test_transient_errors_that_last_are_raised_once_retrying_gives_up(tmp_path):
    waits = []

    def sleep(seconds: float) -> None:  # real time must pass for the give-up to come
        waits.append(seconds)
        time.sleep(0.05)

    storage = RetryingStorage(FlakyStorage(tmp_path, rate=2.0), sleep=sleep,
                              give_up_seconds=0.3)
    with pytest.raises(OSError) as info:
        storage.write_atomic("x", b"1")
    assert info.value.errno in (errno.ENOTCONN, errno.EIO)
    assert len(waits) >= 2  # it was tried again before it gave up


def test_other_errors_are_not_retried(tmp_path):
    waits = []
    storage = RetryingStorage(LocalStorage(tmp_path), sleep=waits.append)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("missing")
    assert waits == []


def test_read_range(storage):
    storage.write_atomic("f", bytes(range(100)))
    assert storage.read_range("f", 10, 5) == bytes(range(10, 15))
    assert storage.read_range("f", 95, 10) == bytes(range(95, 100))
    assert storage.read_range("f", 100, 10) == b""
    with pytest.raises(FileNotFoundError):
        storage.read_range("missing", 0, 1)


def test_free_bytes_is_a_count_or_unknown(storage):
    """Every backend answers (a job's footprint is compared with it before the job starts):
    a folder its disk's free space, the Drive API its quota less usage, or None if unknown."""
    free = storage.free_bytes()
    assert free is None or (isinstance(free, int) and free >= 0)


def test_remove_temps_takes_a_killed_writers_temp_files_and_nothing_else(storage):
    """A writer SIGKILLed between a temp name's write and its rename leaves the temp (on a
    folder; a Drive API write is whole and leaves none): the bookkeeping after a commit removes
    what is left, through whatever wraps the backend (retries, the mount's confirmation)."""
    storage.write_atomic("done/j/tensorboard/events.out.tfevents.1", b"kept")
    folder = storage.local_path("done/j/tensorboard")
    if folder is not None:
        (folder / f".events.out.tfevents.2{TMP_MARK}7-0a1b2c3d").write_bytes(b"half")
    removed = storage.remove_temps("done/j")
    assert removed == (1 if folder is not None else 0)
    assert storage.list_dir("done/j/tensorboard") == ["events.out.tfevents.1"]
    if folder is not None:
        assert sorted(p.name for p in folder.iterdir()) == ["events.out.tfevents.1"]
