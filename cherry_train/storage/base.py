"""The storage interface every backend implements: a few primitives over root-relative paths.

Paths are '/'-separated and relative to the queue root. Everything the queue protocol needs is
built from these primitives, so a new backend (Drive API) only has to get them right, and one
contract test suite (tests/test_storage_contract.py) checks every backend the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path


@dataclass(frozen=True)
class FileInfo:
    size: int
    modified: datetime
    is_dir: bool = False


class Storage(ABC):
    """A queue root. Implementations must make write_atomic and create_exclusive all-or-nothing:
    a reader sees the old content, or the new content whole, never a prefix."""

    #: Shown to people ("local folder /content/drive/MyDrive/traina").
    description: str

    @abstractmethod
    def read_bytes(self, path: str) -> bytes:
        """The file's content; FileNotFoundError if there is none."""

    @abstractmethod
    def read_range(self, path: str, offset: int, length: int) -> bytes:
        """Up to `length` bytes from `offset` (b"" at the end): for resumable downloads."""

    @abstractmethod
    def write_atomic(self, path: str, data: bytes) -> None:
        """Create or replace the file in one step (temp name, then rename)."""

    @abstractmethod
    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create the file with this content unless it exists; True if this call created it
        (or the file already holds exactly this content: repeating a create is safe).

        This is the only primitive that arbitrates between workers (claims, results)."""

    @abstractmethod
    def list_dir(self, path: str) -> list[str]:
        """Names of the entries in a folder, sorted; [] if the folder does not exist.
        Temp files of unfinished writes are not listed."""

    @abstractmethod
    def stat(self, path: str) -> FileInfo | None:
        """Size and modification time, or None if there is no such file."""

    @abstractmethod
    def move(self, src: str, dst: str) -> None:
        """Rename src to dst, replacing dst; FileNotFoundError if src is missing."""

    @abstractmethod
    def delete(self, path: str) -> None:
        """Remove a file (or a whole folder); a missing one is not an error."""

    @abstractmethod
    def upload(self, local: Path, path: str) -> None:
        """Store a large local file at `path`, atomically. The local file is left as it is,
        so an upload can be repeated after an error."""

    @abstractmethod
    def download(self, path: str, local: Path) -> None:
        """Copy a stored file to a local path (written under a temp name, then renamed)."""

    def list_entries(self, path: str) -> dict[str, FileInfo]:
        """name -> FileInfo for every entry of a folder ({} if it does not exist). Backends
        where one listing carries sizes and times (Drive) override this."""
        found = {}
        for name in self.list_dir(path):
            info = self.stat(f"{path.rstrip('/')}/{name}" if path.strip("/") else name)
            if info is not None:
                found[name] = info
        return found

    def stat_in_subfolders(self, path: str, name: str) -> dict[str, FileInfo]:
        """subfolder -> FileInfo of its entry `name`, for every subfolder of `path` that has one
        (`cherry status`: every job's result.json, to tell a cached row still holds). Here one
        stat each, 16 in flight (round trips on a network mount); the Drive API backend finds
        them with a search per 25 subfolders."""
        folder = path.rstrip("/")
        subfolders = self.list_dir(folder)
        with ThreadPoolExecutor(16) as pool:
            infos = pool.map(lambda sub: self.stat(f"{folder}/{sub}/{name}"), subfolders)
            return {sub: info for sub, info in zip(subfolders, infos, strict=True)
                    if info is not None and not info.is_dir}

    def reserve_ids(self, count: int) -> list[str]:
        """Ids to create files with later, for backends whose exclusive create needs them
        (Drive: a second create of one id fails). [] where exclusive create is native."""
        return []

    def use_ids(self, ids: dict[str, str]) -> None:  # noqa: B027 (most backends need no ids)
        """Create these paths with these reserved ids, if this backend uses ids at all."""

    #: Whether a write may return before the file is safe (the Colab mount uploads later):
    #: then confirm_durable() is worth waiting for, off the training thread.
    confirms_later: bool = False

    def confirm_durable(self, path: str, timeout: float | None = None) -> bool:
        """True once the file at `path` is stored safely. Local disks and the Drive API: as soon
        as the write returned. A mount that uploads in the background: once Drive has it."""
        return True

    def local_path(self, path: str) -> Path | None:
        """The path on this machine's file system, where the backend is a plain folder."""
        return None

    def remove_temps(self, path: str) -> int:
        """Remove the temp files that writers killed mid-write left below folder `path` (a
        SIGKILL between a temp name's write and its rename), once no writer can still be
        writing there; the number removed. Backends whose writes are whole leave none."""
        return 0

    def free_bytes(self) -> int | None:
        """Bytes that may still be stored here, or None where that is unknown (a job that may
        not fit is then started anyway)."""
        return None

    # Helpers built from the primitives -------------------------------------------------------

    def exists(self, path: str) -> bool:
        return self.stat(path) is not None

    def read_text_or_none(self, path: str) -> str | None:
        try:
            return self.read_bytes(path).decode()
        except FileNotFoundError:
            return None


class ReadOnlyStorage:
    """The read half of a storage. Training, checkpoints and reporting hold this, never the
    storage itself: every write or delete of a job's files goes through the attempt's fenced
    Owner (docs/contract.md §4), so a stale attempt cannot touch the live owner's files by
    accident."""

    READS = frozenset({"read_bytes", "read_range", "read_text_or_none", "exists", "stat",
                       "list_dir", "list_entries", "stat_in_subfolders", "download", "free_bytes",
                       "local_path", "description", "confirms_later", "confirm_durable"})

    def __init__(self, inner: Storage):
        self._inner = inner

    def __getattr__(self, name: str):
        if name == "sibling" and hasattr(self._inner, "sibling"):  # another Drive folder (data)
            return lambda path: ReadOnlyStorage(self._inner.sibling(path))
        if name not in self.READS:
            raise AttributeError(f"{name!r}: this storage is read-only here; a job's files are "
                                 "written through its Owner")
        return getattr(self._inner, name)
