"""Where a job's data comes from: a folder (or archive) on this machine's file system (the Colab
Drive mount, a local folder) or in a storage backend (a Drive API root); each file copied to
the cache checked by size, and retried on a mount's transient errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cherry_train import datapack, faults
from cherry_train.backoff import Backoff
from cherry_train.checksums import file_sha256
from cherry_train.files import replacing
from cherry_train.safepaths import UnsafePath, plain_name
from cherry_train.storage.base import Storage
from cherry_train.storage.retrying import is_transient
from cherry_train.worker.errors import JobError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
#: Copies from a folder here (the Drive mount) are retried like RetryingStorage's calls; copies
#: through a storage (Drive API) are retried by it already, and only checked here.
COPY_BACKOFF = Backoff(first=0.5, cap=20, give_up_after=300)
COPY_CHUNK = 1 << 20


def _scan(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as entries:
        return list(entries)


def _copy_file(src: Path, dst: Path) -> None:
    """Never through a link: the listing skipped them, and one put there since is refused
    (ELOOP) rather than followed out of the folder."""
    fd = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with open(fd, "rb") as source, open(dst, "wb") as target:
        shutil.copyfileobj(source, target, COPY_CHUNK)


def _retry(fn, *args):
    # Tried once plainly first: a listing stats 60,000 files, and making a Retrying for each
    # cost more than the stats. A Retrying per call after that: copies run on many threads.
    try:
        return fn(*args)
    except OSError as e:
        if not is_transient(e):
            raise
    return COPY_BACKOFF.retrying(is_transient, event="data copy failed, retrying")(fn, *args)


class Source:
    """A data folder or archive to cache: on this machine's file system (the Colab mount,
    a local folder) or in a storage backend (a Drive API root). Listing and copying are
    retried on transient errors."""

    name: str
    label: str  # names the source in the cache key, logs and the result

    def exists(self) -> bool:
        raise NotImplementedError

    def is_archive(self) -> bool:
        return self.name.lower().endswith(ARCHIVE_SUFFIXES)

    def listing(self) -> dict[str, tuple[int, int]]:
        """relative path -> (size, mtime_ns) of every file (the archive itself for one)."""
        raise NotImplementedError

    def copy(self, rel: str, target: Path, size: int) -> str:
        """Copy one file to target (checked by size), return its sha256."""
        raise NotImplementedError

    def pack_place(self) -> datapack.PackPlace | None:
        """Where this folder's data pack is (see datapack.py), or None where it has none."""
        return None

    def can_build_pack(self) -> bool:
        return False


class LocalSource(Source):
    def __init__(self, path: Path):
        self.path, self.name, self.label = Path(path), Path(path).name, str(path)

    def exists(self) -> bool:
        return _retry(self.path.exists)

    def listing(self) -> dict[str, tuple[int, int]]:
        if self.is_archive():
            st = _retry(self.path.stat)
            return {self.name: (st.st_size, st.st_mtime_ns)}
        return datapack.list_folder(self.path, stat=lambda p: _retry(os.stat, p),
                                    scan=lambda p: _retry(_scan, p))

    def copy(self, rel: str, target: Path, size: int) -> str:
        root = self.path.parent if self.is_archive() else self.path

        def fetch(tmp: Path) -> None:
            faults.slow("open")  # a simulated network mount: one round trip per file opened
            _copy_file(root / rel, tmp)

        return _copy_with(fetch, root / rel, target, size, retry=True)

    def pack_place(self) -> datapack.PackPlace:
        return datapack.FolderPackPlace(self.path.parent / f"{self.name}{datapack.PACK_SUFFIX}")

    def can_build_pack(self) -> bool:
        return True


class StorageSource(Source):
    """A folder (or archive) below a storage root, e.g. `data/train` of a `gdrive:` root."""

    def __init__(self, storage: Storage, path: str):
        self.storage, self.path = storage, path.strip("/")
        self.name = self.path.rsplit("/", 1)[-1]
        self.label = f"{storage.description}: {self.path}"

    def exists(self) -> bool:
        return self.storage.exists(self.path)

    def listing(self) -> dict[str, tuple[int, int]]:
        if self.is_archive():
            info = self.storage.stat(self.path)
            return {self.name: (info.size, _ns(info.modified))} if info else {}
        found: dict[str, tuple[int, int]] = {}
        folders = [""]
        while folders:  # breadth first: one listing per folder
            rel = folders.pop()
            for name, info in self.storage.list_entries(f"{self.path}/{rel}".rstrip("/")).items():
                if name.startswith("."):
                    continue
                try:  # Drive allows '/' and '..' in a name: it must not pick another file
                    plain_name(name, f"{self.label}/{rel}".rstrip("/"))
                except UnsafePath as e:
                    raise JobError(f"data: {e}") from None
                child = f"{rel}/{name}".lstrip("/")
                if info.is_dir:
                    folders.append(child)
                else:
                    found[child] = (info.size, _ns(info.modified))
        return found

    def copy(self, rel: str, target: Path, size: int) -> str:
        remote = self.path if self.is_archive() else f"{self.path}/{rel}"
        # The storage retries its own requests: no second layer of retries around them.
        return _copy_with(lambda tmp: self.storage.download(remote, tmp), remote, target, size,
                          retry=False)

    def pack_place(self) -> datapack.PackPlace:
        # Read only: the worker reads an API root through a read-only view, so packs of such
        # roots are built with `cherry data pack` on a machine that syncs the folder.
        return datapack.StoragePackPlace(self.storage, f"{self.path}{datapack.PACK_SUFFIX}")


def _ns(when) -> int:
    return int(when.timestamp() * 1_000_000_000)


def _copy_with(fetch, source, target: Path, size: int, retry: bool) -> str:
    """fetch(tmp) one file (retried, with `retry`), check its size, return its sha256."""
    with replacing(target) as tmp:
        def attempt() -> None:
            fetch(tmp)
            if tmp.stat().st_size != size:
                raise OSError(5, f"short copy of {source}: {tmp.stat().st_size} of {size} bytes")

        if retry:
            _retry(attempt)
        else:
            attempt()
        return file_sha256(tmp)
