"""End to end over the Drive API: `cherry submit / worker / status / fetch --root gdrive:...`
as real subprocesses, talking HTTP to the fake Drive v3 served on a local port
($CHERRY_DRIVE_ENDPOINT), authorized with a bearer token ($CHERRY_DRIVE_TOKEN). The data lives
in the Drive folder and reaches the worker through the API."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cherry_train.testing.fakedrive import FakeDrive
from cherry_train.testing.fakehttp import serve

pytestmark = pytest.mark.slow
TOKEN = "ya29.secret-token-for-the-fake"


@pytest.fixture
def server(monkeypatch):
    drive = FakeDrive(token=TOKEN)
    server, endpoint = serve(drive)
    monkeypatch.setenv("CHERRY_DRIVE_ENDPOINT", endpoint)
    monkeypatch.setenv("CHERRY_DRIVE_TOKEN", TOKEN)
    yield drive, endpoint
    server.shutdown()


@pytest.fixture
def served(server, cherry_images):
    """The fake, with the tiny cherry dataset in Drive under team/traina/data."""
    drive, _ = server
    for path in sorted(cherry_images.rglob("*.png")) + sorted(cherry_images.rglob("*.jpg")):
        drive.put("team/traina/data/" + path.relative_to(cherry_images).as_posix(),
                  path.read_bytes())
    return server


def cherry(*args, env=None, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cherry_train", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_submit_worker_status_fetch_on_a_drive_api_root(served, tmp_path, tiny_config):
    drive, _ = served
    cfg = tmp_path / "job.yaml"
    # train_path relative to the queue folder; val_path as the seed writes it, a Colab path,
    # which on this machine (no mount, no Drive for Desktop) is read through the API.
    data = {**tiny_config["data"], "val_path": "/content/drive/MyDrive/team/traina/data/val"}
    cfg.write_text(json.dumps({**tiny_config, "data": data,
                               "training": {**tiny_config["training"], "epochs": 1}}))
    root = ["--root", "gdrive:team/traina"]
    sub = cherry("submit", str(cfg), *root)
    assert sub.returncode == 0, sub.stderr
    assert "data/train: 96 images" in sub.stdout  # pre-flight listed the data in Drive
    assert "MyDrive/team/traina/data/val: 32 images" in sub.stdout
    job_id = sub.stdout.strip().splitlines()[-1]
    worker = cherry("worker", *root, "--exit-when-idle", "--worker-id", "api-w1")
    assert worker.returncode == 0, worker.stderr
    status = cherry("status", *root, "--json")
    (row,) = json.loads(status.stdout)
    assert row["job_id"] == job_id and row["state"] == "succeeded", status.stdout
    fetched = cherry("fetch", job_id[-4:], *root, "--dest", str(tmp_path / "out"))
    assert fetched.returncode == 0, fetched.stderr
    result = json.loads((tmp_path / "out" / job_id / "result.json").read_text())
    assert result["state"] == "succeeded" and result["dataset_sha256"]
    assert (tmp_path / "out" / job_id / "best.pt").stat().st_size > 1000
    # The token never reaches a log line or the files in Drive.
    for text in (sub.stdout, sub.stderr, worker.stdout, worker.stderr, status.stdout,
                 fetched.stdout, fetched.stderr):
        assert TOKEN not in text
    assert not any(TOKEN.encode() in f.content for f in drive.files.values())


def test_bad_or_missing_credentials_are_one_clear_line(server):
    refused = cherry("status", "--root", "gdrive:team/traina",
                     env={"CHERRY_DRIVE_TOKEN": "expired"})
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0, refused.stderr
    assert "refused the credentials" in refused.stderr and "cherry drive login" in refused.stderr
    env = {k: v for k, v in os.environ.items() if k != "CHERRY_DRIVE_TOKEN"}
    missing = subprocess.run([sys.executable, "-m", "cherry_train", "status", "--root",
                              "gdrive:traina"], capture_output=True, text=True, env=env,
                             timeout=60)
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        "error: no Drive credentials on this machine: run `cherry drive login --client-secrets "
        "<client_secret.json>` on this machine (README: 'Google Drive API root'), or set "
        "CHERRY_DRIVE_TOKEN")


def test_a_worker_on_a_missing_drive_folder_says_so(server):
    proc = cherry("worker", "--root", "gdrive:no-such-folder", "--exit-when-idle")
    assert proc.returncode == 2
    assert "gdrive:no-such-folder does not exist" in proc.stderr
