"""The Colab Drive mount, with uploads confirmed through the Drive API.

A file written to /content/drive/MyDrive/... is first written to the VM's disk; the mount
uploads it seconds or minutes later. If the VM dies in between, the checkpoint that the worker
believed saved is gone. With this wrapper the worker still writes through the mount (one writer
per folder: no duplicate folders from two clients racing), and asks the API, read-only, whether
Drive holds the file with the same md5 yet. Until it does, the checkpoint is not counted as
durable: the heartbeat keeps naming the previous one, and older checkpoints are not pruned.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import structlog

from cherry_train.backoff import STOPPING, Backoff, Stopped
from cherry_train.checksums import file_md5
from cherry_train.storage.base import Storage
from cherry_train.storage.local import LocalStorage
from cherry_train.storage.retrying import RetryingStorage

log = structlog.get_logger(__name__)

#: How long to wait for the mount to upload a file before giving up on confirming it (the
#: checkpoint then simply does not count; the next one is tried afresh).
CONFIRM_TIMEOUT_SECONDS = 900.0


class UploadConfirmedMount(RetryingStorage):
    """A local (mounted) folder whose files count as durable once the API sees them.

    `api` is the same folder through the Drive API (anything with `md5(path)`)."""

    confirms_later = True

    def __init__(self, mount_root: Path | str, api, *, timeout: float = CONFIRM_TIMEOUT_SECONDS,
                 sleep: Callable[[float], None] = STOPPING.sleep,
                 monotonic: Callable[[], float] = time.monotonic):
        super().__init__(LocalStorage(mount_root))
        self.api = api
        self.timeout = timeout
        self._sleep, self._monotonic = sleep, monotonic
        self.description = f"{self.inner.description} (uploads confirmed through the Drive API)"

    def confirm_durable(self, path: str, timeout: float | None = None) -> bool:
        local = self.inner.local_path(path)
        try:
            want = file_md5(local)
        except FileNotFoundError:
            return False
        limit = self.timeout if timeout is None else timeout
        waits = Backoff(first=2.0, cap=30.0, give_up_after=limit).waits(self._monotonic)
        while True:
            try:
                if self.api.md5(path) == want:
                    return True
            except Exception as e:  # the API is a second opinion: its errors never fail a job
                log.warning("could not ask the Drive API about an upload", path=path,
                            error=f"{type(e).__name__}: {e}")
            wait = next(waits, None)
            if wait is None:
                log.warning("Drive has not received the file yet; it does not count as saved",
                            path=path, waited_seconds=round(limit))
                return False
            try:
                self._sleep(wait)  # wakes on a stop: the worker waits no longer than it allows
            except Stopped:
                log.warning("stopping: no longer waiting for Drive to receive the file; it "
                            "does not count as saved", path=path)
                return False


def my_drive_folder(root: Path) -> str | None:
    """The path under My Drive of a folder of the Colab mount or of Drive for Desktop."""
    from cherry_train.places import find_my_drive

    my_drive = find_my_drive()
    root = Path(root).absolute()
    if my_drive is None or not root.is_relative_to(my_drive):
        return None
    return root.relative_to(my_drive).as_posix()


def open_confirmed_mount(root: str, api_factory: Callable[[str], Storage] | None = None
                         ) -> UploadConfirmedMount:
    """The mount root `root`, confirmed through the API (the folder of the same path)."""
    folder = my_drive_folder(Path(root))
    if not folder or folder == ".":
        raise ValueError(f"--confirm-uploads: {root} is not a folder inside My Drive (the Colab "
                         "mount /content/drive/MyDrive/... or Drive for Desktop's My Drive)")
    if api_factory is None:
        from cherry_train.storage.gdrive_auth import open_drive as api_factory
    return UploadConfirmedMount(root, api_factory(folder))
