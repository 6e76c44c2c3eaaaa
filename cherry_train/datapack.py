"""Packed copies of data folders: a few large tar shards and an index, beside the folder.

Through the Colab Drive mount every file open is a network round trip, so copying 60,000 small
JPEGs to the VM one by one takes minutes, however many threads do it; copying fourteen 256 MB
files takes as long as the bytes take. A pack is built once (`cherry data pack PATH` on the
laptop, or by the first worker that copies the folder) and every later VM unpacks it.

    <parent>/<name>.cherry-pack/index.json          every file: size, mtime, sha256, its shard
    <parent>/<name>.cherry-pack/shard-<sha>.tar      uncompressed tar (JPEGs do not compress)

Beside the folder, not in it: a folder inside would be one more class to ImageFolder. The
index is written last (a build cut short leaves no index that names missing shards), and shards
are named by their content, so two builders never write different bytes under one name. A
worker uses the pack for the files whose path, size and modification time still match the
folder (the folder is listed anyway, to notice changes); other files are copied one by one,
and a worker that finds the pack stale rebuilds it. Every unpacked file is checked against its
sha256 in the index. A pack costs as much Drive space as the folder: it is said at build time.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import structlog

from cherry_train import faults

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
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".{name}.{os.getpid()}.partial"
        with open(local, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(8 << 20):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, self.path / name)

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


class _Hashing(io.RawIOBase):
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


# -- building ---------------------------------------------------------------------------------

LIST_THREADS = 16
LIST_CHUNK = 64


def list_folder(folder: Path, stat=os.stat, walk=os.walk) -> dict[str, tuple[int, int]]:
    """rel path -> (size, mtime_ns) of every file below `folder`, hidden ones left out."""
    paths = []
    for dirpath, dirnames, filenames in walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        paths += [Path(dirpath) / n for n in filenames if not n.startswith(".")]

    def sizes_and_times(chunk: list[Path]) -> list[tuple[int, int]]:
        found = []
        for path in chunk:
            faults.slow("stat")
            st = stat(path)
            found.append((st.st_size, st.st_mtime_ns))
        return found

    # On a network mount each stat is a round trip: many at once hide the latency. In chunks:
    # one task per file costs more than the stat itself on a local disk.
    chunks = [paths[i:i + LIST_CHUNK] for i in range(0, len(paths), LIST_CHUNK)]
    with ThreadPoolExecutor(LIST_THREADS) as pool:
        found = [s for part in pool.map(sizes_and_times, chunks) for s in part]
    base = len(str(folder)) + 1
    return {str(p)[base:].replace(os.sep, "/"): s for p, s in zip(paths, found, strict=True)}


def pack_folder(folder: Path, shard_bytes: int = SHARD_BYTES, scratch: Path | None = None,
                progress: bool = False) -> tuple[PackIndex, PackPlace, bool]:
    """`cherry data pack PATH`: build (or rebuild) the pack beside a folder on this machine;
    returns its index, where it is, and whether it was built (False: it was current)."""
    import tempfile

    folder = Path(folder).resolve()
    place = FolderPackPlace(folder.parent / f"{folder.name}{PACK_SUFFIX}")
    listing = list_folder(folder)
    if not listing:
        raise PackError(f"{folder} holds no files")
    index = place.index()
    if index is not None and index.is_current(listing):
        return index, place, False
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(listing), desc=f"packing {folder.name}", unit="file")
    try:
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            index = build_pack(folder, listing, place, Path(tmp), str(folder),
                               shard_bytes=shard_bytes,
                               progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    if list_folder(folder) != listing:
        raise PackError(f"{folder} changed while it was packed; pack again")
    return index, place, True

def plan_shards(files: dict[str, int], shard_bytes: int = SHARD_BYTES) -> list[list[str]]:
    """Files (rel -> size) in path order, cut into groups of about `shard_bytes`."""
    shards: list[list[str]] = [[]]
    size = 0
    for rel in sorted(files):
        cost = files[rel] + TAR_OVERHEAD
        if size and size + cost > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(rel)
        size += cost
    return [s for s in shards if s]


def build_pack(folder: Path, listing: dict[str, tuple[int, int]], place: PackPlace,
               scratch: Path, label: str, known: dict[str, str] | None = None,
               shard_bytes: int = SHARD_BYTES,
               progress: Callable[[int], None] | None = None) -> PackIndex:
    """Pack `folder`'s files (`listing`: rel -> (size, mtime_ns), as the source reports them)
    into shards stored at `place`, then the index; returns it. `known` gives sha256s already
    verified (the worker's cache); other files are hashed as they are written. Each shard is
    read back and checked before the index names it."""
    scratch.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict] = {}
    shards: dict[str, dict] = {}
    for group in plan_shards({rel: size for rel, (size, _) in listing.items()}, shard_bytes):
        tmp = scratch / f"shard.{os.getpid()}.tar"
        try:
            digests = _write_shard(folder, group, listing, tmp, known or {}, progress)
            sha = _file_sha256(tmp)
            name = f"shard-{sha[:20]}.tar"
            place.put(name, tmp)
        finally:
            tmp.unlink(missing_ok=True)
        with place.open(name, scratch) as f:  # read back: what a worker will read
            if _stream_sha256(f) != sha:
                raise PackError(f"shard {name} differs from what was written to "
                                f"{place.description}")
        shards[name] = {"bytes": sum(listing[r][0] for r in group), "sha256": sha,
                        "files": len(group)}
        for rel in group:
            size, mtime = listing[rel]
            sha256, offset = digests[rel]
            files[rel] = {"size": size, "mtime_ns": mtime, "sha256": sha256, "shard": name,
                          "offset": offset}
    index = PackIndex(source=label, files=files, shards=shards)
    tmp = scratch / f"{INDEX}.{os.getpid()}"
    tmp.write_bytes(index.to_json())
    try:
        place.put(INDEX, tmp)  # last: only now does the pack exist for readers
    finally:
        tmp.unlink(missing_ok=True)
    for name in place.names():  # shards of an earlier pack, and leftovers of cut builds
        if name != INDEX and name not in shards:
            place.delete(name)
    return index


def _write_shard(folder: Path, group: list[str], listing: dict[str, tuple[int, int]],
                 target: Path, known: dict[str, str],
                 progress: Callable[[int], None] | None) -> dict[str, tuple[str, int]]:
    """A plain tar of the group's files (`tar xf` opens it too); rel -> (sha256, offset of
    the file's bytes in the shard), so that unpacking reads the bytes without parsing tar."""
    digests = {}
    with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel in group:
            size, mtime = listing[rel]
            info = tarfile.TarInfo(rel)
            info.size, info.mtime, info.mode = size, mtime / 1e9, 0o644
            with open(folder / rel, "rb") as f:
                if rel in known:
                    tar.addfile(info, f)
                    digest = known[rel]
                else:
                    hashing = _Hashing(f)
                    tar.addfile(info, io.BufferedReader(hashing))
                    digest = hashing.sha.hexdigest()
            # addfile leaves tar.offset after the data, padded to whole 512-byte blocks.
            digests[rel] = digest, tar.offset - -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if os.path.getsize(folder / rel) != size:
                raise PackError(f"{rel} changed while it was packed; pack again")
            if progress is not None:
                progress(1)
    return digests


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return _stream_sha256(f)


def _stream_sha256(f: BinaryIO) -> str:
    h = hashlib.sha256()
    while chunk := f.read(8 << 20):
        h.update(chunk)
    return h.hexdigest()


# -- unpacking --------------------------------------------------------------------------------

def unpack(index: PackIndex, place: PackPlace, wanted: Iterable[str], target: Path,
           scratch: Path, progress: Callable[[int], None] | None = None) -> dict[str, str]:
    """Extract the `wanted` files into `target` (rel paths kept), each checked by size and
    sha256 against the index; returns rel -> sha256 of those extracted. A shard that cannot be
    read, or a file that fails its check, raises PackError: the caller copies what is left
    file by file."""
    by_shard: dict[str, set[str]] = {}
    for rel in wanted:
        by_shard.setdefault(index.files[rel]["shard"], set()).add(rel)
    scratch.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(UNPACK_THREADS) as pool:
        parts = pool.map(lambda item: _unpack_shard(index, place, item[0], item[1], target,
                                                    scratch, progress), by_shard.items())
        return {rel: sha for part in parts for rel, sha in part.items()}


def _unpack_shard(index: PackIndex, place: PackPlace, shard: str, wanted: set[str],
                  target: Path, scratch: Path, progress) -> dict[str, str]:
    """Read the shard once, front to back, writing the wanted files: each file's bytes are at
    its offset (no tar parsing), each checked against its size and sha256 as it is written.
    No temp names: the cache manifest, written after, is what makes a file count."""
    members = sorted(wanted, key=lambda rel: index.files[rel]["offset"])
    done: dict[str, str] = {}
    made: set[Path] = set()
    try:
        with place.open(shard, scratch) as f:
            at = 0
            for rel in members:
                entry = index.files[rel]
                if entry["offset"] < at:
                    raise PackError(f"shard {shard}: overlapping files in its index")
                _skip(f, entry["offset"] - at)
                path = target / _safe(rel)
                if path.parent not in made:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    made.add(path.parent)
                h = hashlib.sha256()
                left = entry["size"]
                with open(path, "wb") as out:
                    while left:
                        chunk = f.read(min(left, 4 << 20))
                        if not chunk:
                            raise PackError(f"shard {shard} ends inside {rel}")
                        h.update(chunk)
                        out.write(chunk)
                        left -= len(chunk)
                at = entry["offset"] + entry["size"]
                if h.hexdigest() != entry["sha256"]:
                    path.unlink(missing_ok=True)
                    raise PackError(f"{rel} in {place.description}/{shard} does not match "
                                    "its sha256 in the index")
                done[rel] = entry["sha256"]
                if progress is not None:
                    progress(1)
    except OSError as e:
        raise PackError(f"shard {shard} of {place.description} cannot be read: "
                        f"{type(e).__name__}: {e}") from e
    return done


def _skip(f: BinaryIO, n: int) -> None:
    while n > 0:  # read rather than seek: the stream may be a download or a pipe
        chunk = f.read(min(n, 1 << 20))
        if not chunk:
            raise PackError("shard ends before a file's bytes")
        n -= len(chunk)


def _safe(rel: str) -> str:
    """A path from an index: relative, inside the target (an index is data, not trusted)."""
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
        raise PackError(f"pack member {rel!r} would be written outside the cache")
    return rel
