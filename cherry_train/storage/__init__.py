"""Storage backends for a queue root, behind one small interface (see base.py)."""

from __future__ import annotations

from cherry_train.storage.base import FileInfo, Storage
from cherry_train.storage.local import LocalStorage
from cherry_train.storage.retrying import RetryingStorage

__all__ = ["FileInfo", "LocalStorage", "RetryingStorage", "Storage", "is_outage",
           "open_storage"]


def is_outage(exc: BaseException) -> bool:
    """An error of the queue root's storage that outlasted the backend's own retries and may
    yet go away: the mount's OS errors, a failing Drive API. Not refused credentials: those
    need the user, nor a machine whose TLS cannot be verified."""
    from cherry_train.storage.gdrive_api import DriveAuthError, DriveError, DriveSetupError

    return isinstance(exc, OSError | DriveError) and \
        not isinstance(exc, DriveAuthError | DriveSetupError)


class UnsupportedRoot(ValueError):
    """A root spec that no installed backend can open."""


def open_storage(root: str) -> Storage:
    """The backend for a root spec: `gdrive:<folder path>` (or `gdrive:id:<folder id>`) for
    the Drive API, else a local folder (behind retries for a flaky mount)."""
    if root.startswith("gdrive:"):
        folder = root[len("gdrive:"):].strip("/")
        if not folder:
            raise UnsupportedRoot(f"root {root!r}: name a folder, e.g. gdrive:traina "
                                  "(a path under My Drive) or gdrive:id:<folder id>")
        from cherry_train.storage.gdrive_auth import open_drive

        return open_drive(folder)
    return RetryingStorage(LocalStorage(root))
