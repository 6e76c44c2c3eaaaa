"""The Drive backend against a real Google Drive folder (`pytest -m live`): these tests, and
the whole storage contract suite (tests/test_storage_contract.py, its "drive-live" case).
Skipped unless CHERRY_LIVE_DRIVE_ROOT (e.g. gdrive:cherry-live-tests) names a folder and this
machine has Drive credentials (`cherry drive login`, or CHERRY_DRIVE_TOKEN). Each test works in
a new subfolder and deletes it at the end."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.live

def test_a_reserved_id_is_refused_the_second_time(live_folder):
    (file_id,) = live_folder.reserve_ids(1)
    live_folder.use_ids({"done/j/attempts/1.json": file_id})
    assert live_folder.create_exclusive("done/j/attempts/1.json", b"worker 1") is True
    assert live_folder.create_exclusive("done/j/attempts/1.json", b"worker 2") is False
    assert live_folder.read_bytes("done/j/attempts/1.json") == b"worker 1"


def test_a_large_file_goes_up_resumably_and_comes_back(live_folder, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(6 * 1024 * 1024))  # over the one-request limit: resumable
    live_folder.upload(big, "done/big.bin")
    live_folder.download("done/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()
