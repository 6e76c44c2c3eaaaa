"""A pack's format and where it lives: the index (every file: size, mtime, sha256, its shard
and offset) and the places that hold shards (a folder here, or a storage root)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import structlog

from cherry_train import faults, files

log = structlog.get_logger(__name__)

PACK_SUFFIX = ".cherry-pack"
INDEX = "index.json"
FORMAT = 1
SHARD_BYTES = 256 << 20
TAR_OVERHEAD = 1024  # a header and padding per file
#: `data.pack: auto` builds a pack for folders with at least this many files: below it, the
#: file-by-file copy takes seconds even through the mount.
AUTO_MIN_FILES = 2000
#: Modification times are compared to the second: Drive keeps milliseconds, local disks keep
#: nanoseconds, and the same file seen through each must still match.
MTIME_TOLERANCE_NS = 1_000_000_000
UNPACK_THREADS = 4  # shards are large: a few at a time keep the link busy


class PackError(Exception):
    """A pack that cannot be used (unreadable index, a file that fails its check)."""


@dataclass
class PackIndex:
    source: str
    files: dict[str, dict]  # rel -> {"size", "mtime_ns", "sha256", "shard"}
    shards: dict[str, dict]  # name -> {"bytes", "sha256", "files"}
    created_at: float = field(default_factory=time.time)
    format: int = FORMAT

    @property
    def bytes(self) -> int:
        return sum(s["bytes"] for s in self.shards.values())

    def to_json(self) -> bytes:
        return json.dumps({"format": self.format, "source": self.source,
                           "created_at": self.created_at, "shards": self.shards,
                           "files": self.files}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> PackIndex:
        data = json.loads(raw)
        if data.get("format") != FORMAT:
            raise PackError(f"pack format {data.get('format')}, expected {FORMAT}")
        return cls(source=data["source"], files=data["files"], shards=data["shards"],
                   created_at=data["created_at"])

    def matching(self, listing: dict[str, tuple[int, int]]) -> set[str]:
        """The files of `listing` (rel -> (size, mtime_ns)) that the pack holds as they are."""
        return {rel for rel, (size, mtime) in listing.items()
                if (f := self.files.get(rel)) is not None and f["size"] == size
                and abs(f["mtime_ns"] - mtime) < MTIME_TOLERANCE_NS}

    def is_current(self, listing: dict[str, tuple[int, int]]) -> bool:
        return set(self.files) == set(listing) and len(self.matching(listing)) == len(listing)


class PackPlace:
    """Where a folder's pack is kept: a folder on this machine (the mount) or below a storage
    root (a Drive API root)."""

    description: str

    def read(self, name: str) -> bytes | None:
        raise NotImplementedError

    def open(self, name: str, scratch: Path) -> BinaryIO:
        """A shard, to read once from start to end."""
        raise NotImplementedError

    def put(self, name: str, local: Path) -> None:
        """Store a local file under `name`, whole or not at all (temp name, then rename)."""
        raise NotImplementedError

    def names(self) -> list[str]:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def index(self) -> PackIndex | None:
        """The pack's index; None if there is none or it cannot be read (logged)."""
        try:
            raw = self.read(INDEX)
            return None if raw is None else PackIndex.from_json(raw)
        except (OSError, ValueError, KeyError, PackError) as e:
            log.warning("data pack ignored: its index cannot be read", pack=self.description,
                        error=f"{type(e).__name__}: {e}")
            return None


class FolderPackPlace(PackPlace):
    def __init__(self, path: Path):
        self.path = Path(path)
        self.description = str(path)

    def read(self, name: str) -> bytes | None:
        try:
            faults.slow("open")
            return (self.path / name).read_bytes()
        except FileNotFoundError:
            return None

    def open(self, name: str, scratch: Path) -> BinaryIO:
        faults.slow("open")
        return open(self.path / name, "rb", buffering=1 << 20)

    def put(self, name: str, local: Path) -> None:
        with files.replacing(self.path / name) as tmp, open(local, "rb") as src, \
                open(tmp, "wb") as dst:
            while chunk := src.read(8 << 20):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())

    def names(self) -> list[str]:
        try:
            return sorted(os.listdir(self.path))
        except FileNotFoundError:
            return []

    def delete(self, name: str) -> None:
        (self.path / name).unlink(missing_ok=True)


class StoragePackPlace(PackPlace):
    def __init__(self, storage, path: str):
        self.storage, self.path = storage, path.strip("/")
        self.description = f"{storage.description}: {self.path}"

    def read(self, name: str) -> bytes | None:
        try:
            return self.storage.read_bytes(f"{self.path}/{name}")
        except FileNotFoundError:
            return None

    def open(self, name: str, scratch: Path) -> BinaryIO:
        local = scratch / f"{name}.download"
        self.storage.download(f"{self.path}/{name}", local)
        return _DeletedOnClose(local)

    def put(self, name: str, local: Path) -> None:
        self.storage.upload(local, f"{self.path}/{name}")

    def names(self) -> list[str]:
        return sorted(self.storage.list_dir(self.path))

    def delete(self, name: str) -> None:
        self.storage.delete(f"{self.path}/{name}")


class _DeletedOnClose(io.FileIO):
    def __init__(self, path: Path):
        super().__init__(path, "rb")
        self._local = path

    def close(self) -> None:
        super().close()
        self._local.unlink(missing_ok=True)


class Hashing(io.RawIOBase):
    """Reads through to `raw`, hashing every byte (the shard's sha256 in the same pass)."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.sha = raw, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        if n:
            self.sha.update(memoryview(buffer)[:n])
        return n or 0


