"""The Drive backend against a real Google Drive folder. Skipped unless
CHERRY_LIVE_DRIVE_ROOT (e.g. gdrive:cherry-live-tests) names a folder and this machine has
Drive credentials (`cherry drive login`, or CHERRY_DRIVE_TOKEN). Each run works in a new
subfolder and deletes it at the end."""

from __future__ import annotations

import os
import uuid

import pytest
from concurrently import at_once

pytestmark = pytest.mark.live

LIVE_ROOT = os.environ.get("CHERRY_LIVE_DRIVE_ROOT", "")


@pytest.fixture(scope="module")
def live():
    if not LIVE_ROOT.startswith("gdrive:"):
        pytest.skip("set CHERRY_LIVE_DRIVE_ROOT=gdrive:<folder> to run the live Drive tests")
    from cherry_train.storage import open_storage
    from cherry_train.storage.gdrive import DriveAuthError

    run = f"run-{uuid.uuid4().hex[:8]}"
    try:
        storage = open_storage(f"{LIVE_ROOT.rstrip('/')}/{run}")
    except DriveAuthError as e:
        pytest.skip(str(e))
    yield storage
    parent = open_storage(LIVE_ROOT)
    parent.delete(run)


def test_round_trip_and_listing(live, tmp_path):
    live.write_atomic("queue/a.json", b"one")
    live.write_atomic("queue/a.json", b"two")
    assert live.read_bytes("queue/a.json") == b"two"
    assert live.read_range("queue/a.json", 1, 5) == b"wo"
    assert live.list_dir("queue") == ["a.json"]
    live.move("queue/a.json", "done/a.json")
    assert live.list_dir("queue") == [] and live.read_bytes("done/a.json") == b"two"
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(6 * 1024 * 1024))  # over the one-request limit: resumable
    live.upload(big, "done/big.bin")
    live.download("done/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()


def test_a_reserved_id_is_refused_the_second_time(live):
    (file_id,) = live.reserve_ids(1)
    live.use_ids({"done/j/attempts/1.json": file_id})
    wins = []

    def claim(i, _):
        if live.create_exclusive("done/j/attempts/1.json", f"worker {i}".encode()):
            wins.append(i)

    at_once(4, claim)
    assert len(wins) == 1
    assert live.read_bytes("done/j/attempts/1.json") == f"worker {wins[0]}".encode()
