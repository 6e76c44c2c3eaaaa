"""A local copy of a job's data, made before training.

Reading thousands of small images through the Colab Drive mount is slow and now and then fails
(Errno 107), so each data folder is copied to local disk first: in parallel, every copy retried
on transient errors and checked by size, with an integrity manifest (every file's path, size,
modification time and sha256). The next job reuses an unchanged copy without reading it again;
a changed dataset is refreshed file by file. A .zip/.tar dataset is copied as one file and
extracted locally. The dataset's content hash goes into the result, so every model can be traced
to the exact data it saw.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import platformdirs
import structlog
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

from cherry_train import datapack, faults
from cherry_train.checksums import file_sha256
from cherry_train.jobqueue.roots import on_colab
from cherry_train.sizes import human_bytes
from cherry_train.storage.base import Storage
from cherry_train.storage.retrying import is_transient
from cherry_train.worker.errors import JobError

log = structlog.get_logger(__name__)

MANIFEST = ".cherry-dataset.json"
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
COPY_THREADS = 16  # I/O bound: the mount answers many requests at once much faster than one
_RETRYING = Retrying(retry=retry_if_exception(is_transient), wait=wait_exponential(0.5, max=20),
                     stop=stop_after_delay(300), reraise=True)


def _retry(fn, *args):
    return _RETRYING.copy()(fn, *args)  # a copy per call: copies run on many threads


@dataclass
class CacheReport:
    """What the result records about one data folder."""

    source: str
    local: str
    sha256: str
    files: int
    bytes: int
    copied_files: int  # 0 when the cached copy was reused as it was
    copy_seconds: float
    unpacked_files: int = 0  # of the copied ones, those taken from the folder's data pack
    pack: str | None = None  # "built" (this copy made it), "current", or None (no pack)


def default_cache_dir() -> Path:
    if os.environ.get("CHERRY_CACHE_DIR"):
        return Path(os.environ["CHERRY_CACHE_DIR"])
    if on_colab():
        return Path("/content/cherry-cache")  # the VM's local disk, not the Drive mount
    return platformdirs.user_cache_path("cherry-train") / "datasets"


def _entry(cache_dir: Path, source: Source) -> Path:
    key = hashlib.sha1(source.label.encode()).hexdigest()[:12]
    return cache_dir / f"{source.name.split('.')[0][:40]}-{key}"


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
        return datapack.list_folder(self.path, stat=lambda p: _retry(p.stat),
                                    walk=lambda p: _retry(os.walk, p))

    def copy(self, rel: str, target: Path, size: int) -> str:
        root = self.path.parent if self.is_archive() else self.path

        def fetch(tmp: Path) -> None:
            faults.slow("open")  # a simulated network mount: one round trip per file opened
            shutil.copyfile(root / rel, tmp)

        return _copy_with(fetch, root / rel, target, size)

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
                child = f"{rel}/{name}".lstrip("/")
                if info.is_dir:
                    folders.append(child)
                else:
                    found[child] = (info.size, _ns(info.modified))
        return found

    def copy(self, rel: str, target: Path, size: int) -> str:
        remote = self.path if self.is_archive() else f"{self.path}/{rel}"
        return _copy_with(lambda tmp: self.storage.download(remote, tmp), remote, target, size)

    def pack_place(self) -> datapack.PackPlace:
        # Read only: the worker reads an API root through a read-only view, so packs of such
        # roots are built with `cherry data pack` on a machine that syncs the folder.
        return datapack.StoragePackPlace(self.storage, f"{self.path}{datapack.PACK_SUFFIX}")


def _ns(when) -> int:
    return int(when.timestamp() * 1_000_000_000)


def _copy_with(fetch, source, target: Path, size: int) -> str:
    """fetch(tmp) one file (retried), check its size, return its sha256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{threading.get_ident()}.partial")

    def attempt() -> None:
        fetch(tmp)
        if tmp.stat().st_size != size:
            raise OSError(5, f"short copy of {source}: {tmp.stat().st_size} of {size} bytes")

    _retry(attempt)
    digest = file_sha256(tmp)
    os.replace(tmp, target)
    return digest


def _dataset_sha256(files: dict[str, dict]) -> str:
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel]['sha256']}\n".encode())
    return h.hexdigest()


@contextmanager
def _locked(entry: Path):
    """One copier per cache entry at a time (several workers may share a VM)."""
    entry.mkdir(parents=True, exist_ok=True)
    with open(entry / ".lock", "w") as f:
        try:
            import fcntl
        except ImportError:  # Windows: no worker runs there, but stay importable
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cache_folder(source: Path | Source, cache_dir: Path, progress: bool = False,
                 pack: str = "auto") -> CacheReport:
    """Make (or refresh, or reuse) the local copy of one data folder or archive. `pack`
    (data.pack): whether to unpack the folder's data pack and build one (datapack.py)."""
    source = source if isinstance(source, Source) else LocalSource(source)
    if not source.exists():
        raise JobError(f"data: {source.label} does not exist")
    entry = _entry(cache_dir, source)
    with _locked(entry):
        return _cache(source, entry, progress, pack)


def _cache(source: Source, entry: Path, progress: bool, pack: str = "auto") -> CacheReport:
    started = time.perf_counter()
    manifest_path = entry / MANIFEST
    try:
        old = json.loads(manifest_path.read_text())
    except (FileNotFoundError, ValueError):
        old = {"files": {}}
    listing = source.listing()
    if not listing:
        raise JobError(f"data: {source.label} is empty")
    files_dir = entry / "files"

    # Unchanged files (same path, size and mtime, present locally) are kept as they are.
    files: dict[str, dict] = {}
    todo = []
    for rel, (size, mtime) in listing.items():
        known = old["files"].get(rel)
        if known and known["size"] == size and known["mtime_ns"] == mtime and \
                (files_dir / rel).is_file():
            files[rel] = known
        else:
            todo.append((rel, size, mtime))
    for rel in set(old["files"]) - set(listing):  # deleted at the source
        (files_dir / rel).unlink(missing_ok=True)

    place = source.pack_place() if pack != "off" and not source.is_archive() else None
    index = None
    unpacked = 0
    if todo and place is not None and (index := place.index()) is not None:
        unpacked, todo = _unpack(index, place, todo, files, files_dir, entry, progress)
    if todo:
        bar = _bar(progress, len(todo), source.name)
        with ThreadPoolExecutor(COPY_THREADS) as pool:
            digests = pool.map(lambda t: source.copy(t[0], files_dir / t[0], t[1]), todo)
            for (rel, size, mtime), digest in zip(todo, digests, strict=True):
                files[rel] = {"size": size, "mtime_ns": mtime, "sha256": digest}
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
    sha = _dataset_sha256(files)
    local = files_dir
    if source.is_archive():
        local = _extract(files_dir / source.name, entry / "extracted", sha,
                         fresh=bool(todo) or old.get("sha256") != sha)
    copied = len(todo) + unpacked
    pack_state = fingerprint = None
    if place is not None:
        fingerprint = _fingerprint(listing)
        pack_state = _pack_state(source, place, pack, index, listing, files, files_dir, entry,
                                 fingerprint == old.get("pack_fingerprint"), progress)
    manifest = {"source": source.label, "sha256": sha, "files": files,
                "pack_fingerprint": fingerprint if pack_state else None}
    if copied or old.get("sha256") != sha or \
            old.get("pack_fingerprint") != manifest["pack_fingerprint"]:
        tmp = manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest))
        os.replace(tmp, manifest_path)  # last: a copy interrupted before this is redone
    report = CacheReport(source=source.label, local=str(local), sha256=sha, files=len(files),
                         bytes=sum(f["size"] for f in files.values()), copied_files=copied,
                         copy_seconds=round(time.perf_counter() - started, 3),
                         unpacked_files=unpacked, pack=pack_state)
    log.info("data cached" if copied else "data cache reused", **asdict(report))
    return report


def _unpack(index: datapack.PackIndex, place: datapack.PackPlace, todo: list, files: dict,
            files_dir: Path, entry: Path, progress: bool) -> tuple[int, list]:
    """Take what the pack holds unchanged from it; the files left to copy one by one."""
    usable = index.matching({rel: (size, mtime) for rel, size, mtime in todo})
    if not usable:
        return 0, todo
    started = time.perf_counter()
    bar = _bar(progress, len(usable), f"unpacking {place.description}")
    try:
        digests = datapack.unpack(index, place, usable, files_dir, entry / "unpack",
                                  bar.update if bar is not None else None)
    except datapack.PackError as e:
        log.warning("data pack not used; copying file by file", pack=place.description,
                    error=str(e))
        return 0, todo
    finally:
        if bar is not None:
            bar.close()
    for rel, size, mtime in todo:
        if rel in digests:
            files[rel] = {"size": size, "mtime_ns": mtime, "sha256": digests[rel]}
    log.info("data unpacked", pack=place.description, files=len(digests),
             seconds=round(time.perf_counter() - started, 2))
    return len(digests), [t for t in todo if t[0] not in digests]


def _fingerprint(listing: dict[str, tuple[int, int]]) -> str:
    h = hashlib.sha256()
    for rel in sorted(listing):
        h.update(f"{rel}\0{listing[rel][0]}\0{listing[rel][1] // 10**9}\n".encode())
    return h.hexdigest()


def _pack_state(source: Source, place: datapack.PackPlace, pack: str,
                index: datapack.PackIndex | None, listing: dict, files: dict, files_dir: Path,
                entry: Path, known_current: bool, progress: bool) -> str | None:
    """"current" when the folder's pack matches it, "built" when this call built it, None when
    it has none (and need not, or cannot, have one). A failed build is logged; the job goes on."""
    if known_current:
        return "current"  # checked when this cache was last filled; the folder is unchanged
    if index is None:
        index = place.index()
    if index is not None and index.is_current(listing):
        return "current"
    wanted = pack == "on" or (pack == "auto" and len(listing) >= datapack.AUTO_MIN_FILES)
    if not wanted or not source.can_build_pack():
        return None
    started = time.perf_counter()
    bar = _bar(progress, len(listing), f"packing {source.name}")
    try:
        built = datapack.build_pack(files_dir, listing, place, entry / "pack", source.label,
                                    known={rel: f["sha256"] for rel, f in files.items()},
                                    progress=bar.update if bar is not None else None)
    except (OSError, datapack.PackError) as e:
        log.warning("data pack not built; the next worker copies file by file again",
                    pack=place.description, error=f"{type(e).__name__}: {e}")
        return None
    finally:
        if bar is not None:
            bar.close()
    log.info("data pack built: later workers unpack a few large files instead of copying "
             f"{len(listing)} small ones; it takes {human_bytes(built.bytes)} of Drive space "
             "beside the folder (data.pack: off to do without)", pack=place.description,
             shards=len(built.shards), files=len(built.files),
             seconds=round(time.perf_counter() - started, 1))
    return "built"


def _extract(archive: Path, target: Path, sha: str, fresh: bool) -> Path:
    done = target / ".extracted"
    if not fresh and done.is_file() and done.read_text() == sha:
        return target
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                for member in z.namelist():
                    _inside(target, member)
                z.extractall(target)
        else:
            with tarfile.open(archive) as t:
                t.extractall(target, filter="data")  # refuses links and paths outside target
    except (zipfile.BadZipFile, tarfile.TarError) as e:
        raise JobError(f"data: {archive.name} is not a readable archive ({e})") from None
    done.write_text(sha)
    return target


def _inside(target: Path, member: str) -> None:
    if not (target / member).resolve().is_relative_to(target.resolve()):
        raise JobError(f"data: archive member {member!r} would be written outside the cache")


def _bar(enabled: bool, total: int, name: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"copying {name}", unit="file", leave=False)
