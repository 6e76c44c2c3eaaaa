"""Shared fixtures: an isolated environment, the seed config, a tiny cherry dataset."""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
import structlog

SEED_YAML = """\
model:
  name: resnet50
  num_classes: 2
  pretrained: true

training:
  epochs: 100
  batch_size: 32
  learning_rate: 0.001
  optimizer: adam

data:
  train_path: /content/drive/MyDrive/traina/data/train
  val_path: /content/drive/MyDrive/traina/data/val

augmentation:
  enabled: true
  normalize: false  # Set based on production requirements
"""

# Small enough for a CPU test in seconds: 32 px, a few batches.
TINY_CONFIG = {
    "name": "tiny",
    "seed": 3,
    "model": {"name": "resnet18", "num_classes": 2, "pretrained": False},
    "training": {"epochs": 2, "batch_size": 16, "learning_rate": 0.003, "optimizer": "adam"},
    "data": {"train_path": "data/train", "val_path": "data/val", "image_size": 32,
             "num_workers": 0},
    "augmentation": {"enabled": True, "normalize": True},
    "checkpoint": {"every_minutes": 60, "keep_last": 2},
    "heartbeat_seconds": 0.2,
    "lease_seconds": 5,
    "log_every_steps": 2,
    # Seconds per job that most tests do not need; tests of the export and TensorBoard turn
    # them on.
    "export": {"onnx": False},
    "tensorboard": False,
}


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory, monkeypatch):
    """No test reads or writes the user's settings, root or Drive."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("CHERRY_CONFIG_DIR", str(home / "config"))
    monkeypatch.setenv("CHERRY_DATA_DIR", str(home / "data"))
    monkeypatch.setenv("CHERRY_CACHE_DIR", str(home / "cache"))
    for var in ("CHERRY_ROOT", "CHERRY_MYDRIVE", "CHERRY_WORKER_ID", "COLAB_RELEASE_TAG",
                "CHERRY_DRIVE_TOKEN", "CHERRY_DRIVE_ENDPOINT", "CHERRY_KERNEL_KEY",
                "CHERRY_STORED_KERNELS", "CHERRY_WEBHOOK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CHERRY_DEVICE", os.environ.get("CHERRY_TEST_DEVICE", "cpu"))
    # Subprocesses (workers the crash tests kill mid-checkpoint) keep their scratch in here.
    # This process keeps its own temp dir: multiprocessing makes its folder there once, and
    # removes it at exit, long after this test's folder is gone.
    monkeypatch.setattr(tempfile, "tempdir", tempfile.gettempdir())
    (home / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(home / "tmp"))
    yield
    structlog.reset_defaults()  # a CLI call in one test must not set another's log format
    shutil.rmtree(home, ignore_errors=True)  # data caches and scratch: nothing to look at


@pytest.fixture
def tiny_config() -> dict:
    return copy.deepcopy(TINY_CONFIG)


@pytest.fixture(scope="session")
def cherry_images(tmp_path_factory) -> Path:
    """96 train + 32 val synthetic cherries (generated once per session)."""
    from cherry_train.demo.cherries import generate_dataset

    data = tmp_path_factory.mktemp("cherries")
    generate_dataset(data, train=96, val=32, size=40, seed=1)
    return data


@pytest.fixture(scope="session")
def photo_cherries(tmp_path_factory) -> Path:
    """48 train + 16 val cherries of 120 px: larger than the side a 32 px job stores, so a
    prepared pack re-encodes them (generated once per session)."""
    from cherry_train.demo.cherries import generate_dataset

    data = tmp_path_factory.mktemp("photo_cherries")
    generate_dataset(data, train=48, val=16, size=120, seed=2)
    return data


@pytest.fixture
def root_with_data(tmp_path, cherry_images) -> Path:
    """A queue root whose data/ is the tiny cherry dataset (linked, not copied)."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "data").symlink_to(cherry_images, target_is_directory=True)
    return root


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


LIVE_ROOT = os.environ.get("CHERRY_LIVE_DRIVE_ROOT", "")
# The user's own Drive credentials, as they were before isolated_env hid them.
REAL_CREDENTIALS = {k: os.environ.get(k) for k in ("CHERRY_DRIVE_TOKEN", "CHERRY_CONFIG_DIR",
                                                   "CHERRY_DRIVE_ENDPOINT")}


@pytest.fixture
def live_folder(monkeypatch):
    """A new subfolder of the live root, deleted afterwards (with the user's credentials)."""
    if not LIVE_ROOT.startswith("gdrive:"):
        pytest.skip("set CHERRY_LIVE_DRIVE_ROOT=gdrive:<folder> to run the live Drive tests")
    for name, value in REAL_CREDENTIALS.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    from cherry_train.storage import open_storage
    from cherry_train.storage.gdrive_api import DriveAuthError

    run = f"run-{uuid.uuid4().hex[:8]}"
    try:
        storage = open_storage(f"{LIVE_ROOT.rstrip('/')}/{run}")
    except DriveAuthError as e:
        pytest.skip(str(e))
    yield storage
    open_storage(LIVE_ROOT).delete(run)
