"""Storage backends for a queue root, behind one small interface (see base.py)."""

from __future__ import annotations

from cherry_train.storage.base import FileInfo, Storage
from cherry_train.storage.local import LocalStorage
from cherry_train.storage.retrying import RetryingStorage

__all__ = ["FileInfo", "LocalStorage", "RetryingStorage", "Storage", "open_storage"]


class UnsupportedRoot(ValueError):
    """A root spec that no installed backend can open."""


def open_storage(root: str) -> Storage:
    """The backend for a root spec: `gdrive:<folder>` for the Drive API, else a local folder."""
    if root.startswith("gdrive:"):
        raise UnsupportedRoot(
            f"root {root!r}: the Drive API backend is not part of this version yet; use the "
            "Drive folder through Drive for Desktop or the Colab mount (a local path) instead")
    return RetryingStorage(LocalStorage(root))
