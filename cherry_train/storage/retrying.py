"""Retries for a flaky mount: the Colab Drive FUSE mount sometimes answers `Errno 107`
(transport endpoint is not connected) or `Errno 5` (I/O error) for a while, then recovers.
Such errors are retried with back-off and logged; they never fail a job by themselves."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cherry_train.backoff import Backoff
from cherry_train.storage.base import FileInfo, Storage

#: Errors a Drive mount gives while it reconnects. Others (no such file, permission) are real.
TRANSIENT_ERRNOS = frozenset({errno.ENOTCONN, errno.EIO, errno.ESTALE, errno.EAGAIN,
                              errno.ETIMEDOUT, errno.ECONNABORTED})
#: How long to keep trying before the error is raised (a mount remount takes tens of seconds).
GIVE_UP_SECONDS = 300.0

T = TypeVar("T")


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


class RetryingStorage(Storage):
    """Wraps any backend; every primitive is retried on transient OS errors."""

    def __init__(self, inner: Storage, sleep: Callable[[float], None] | None = None,
                 give_up_seconds: float = GIVE_UP_SECONDS):
        self.inner = inner
        self.description = inner.description
        self._retrying = Backoff(first=0.5, cap=30, give_up_after=give_up_seconds, jitter=0.5) \
            .retrying(is_transient, event="storage error, retrying", sleep=sleep)

    def _call(self, fn: Callable[..., T], *args) -> T:
        # A copy per call: the heartbeat thread and the trainer share this storage.
        return self._retrying.copy()(fn, *args)

    def read_bytes(self, path: str) -> bytes:
        return self._call(self.inner.read_bytes, path)

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        return self._call(self.inner.read_range, path, offset, length)

    def write_atomic(self, path: str, data: bytes) -> None:
        self._call(self.inner.write_atomic, path, data)

    def create_exclusive(self, path: str, data: bytes) -> bool:
        # Safe to repeat: a backend answers True when the file holds exactly our data, so a
        # create whose success was hidden by an error is not mistaken for a lost race.
        return self._call(self.inner.create_exclusive, path, data)

    def list_dir(self, path: str) -> list[str]:
        return self._call(self.inner.list_dir, path)

    def stat(self, path: str) -> FileInfo | None:
        return self._call(self.inner.stat, path)

    def move(self, src: str, dst: str) -> None:
        self._call(self.inner.move, src, dst)

    def delete(self, path: str) -> None:
        self._call(self.inner.delete, path)

    def upload(self, local: Path, path: str) -> None:
        self._call(self.inner.upload, local, path)

    def download(self, path: str, local: Path) -> None:
        self._call(self.inner.download, path, local)

    def list_entries(self, path: str) -> dict[str, FileInfo]:
        return self._call(self.inner.list_entries, path)

    def reserve_ids(self, count: int) -> list[str]:
        return self._call(self.inner.reserve_ids, count)

    def use_ids(self, ids: dict[str, str]) -> None:
        self.inner.use_ids(ids)

    def free_bytes(self) -> int | None:
        return self._call(self.inner.free_bytes)

    def remove_temps(self, path: str) -> int:
        return self._call(self.inner.remove_temps, path)

    def local_path(self, path: str) -> Path | None:
        return self.inner.local_path(path)

    @property
    def confirms_later(self) -> bool:  # type: ignore[override]
        return self.inner.confirms_later

    def confirm_durable(self, path: str, timeout: float | None = None) -> bool:
        return self.inner.confirm_durable(path, timeout)
