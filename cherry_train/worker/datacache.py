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

from cherry_train.checksums import file_sha256
from cherry_train.jobqueue.roots import on_colab
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


class LocalSource(Source):
    def __init__(self, path: Path):
        self.path, self.name, self.label = Path(path), Path(path).name, str(path)

    def exists(self) -> bool:
        return _retry(self.path.exists)

    def listing(self) -> dict[str, tuple[int, int]]:
        if self.is_archive():
            st = _retry(self.path.stat)
            return {self.name: (st.st_size, st.st_mtime_ns)}
        found = {}
        for dirpath, dirnames, filenames in _retry(os.walk, self.path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if name.startswith("."):
                    continue
                path = Path(dirpath) / name
                st = _retry(path.stat)
                found[path.relative_to(self.path).as_posix()] = (st.st_size, st.st_mtime_ns)
        return found

    def copy(self, rel: str, target: Path, size: int) -> str:
        root = self.path.parent if self.is_archive() else self.path
        return _copy_with(lambda tmp: shutil.copyfile(root / rel, tmp), root / rel, target, size)


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


def cache_folder(source: Path | Source, cache_dir: Path, progress: bool = False) -> CacheReport:
    """Make (or refresh, or reuse) the local copy of one data folder or archive."""
    source = source if isinstance(source, Source) else LocalSource(source)
    if not source.exists():
        raise JobError(f"data: {source.label} does not exist")
    entry = _entry(cache_dir, source)
    with _locked(entry):
        return _cache(source, entry, progress)


def _cache(source: Source, entry: Path, progress: bool) -> CacheReport:
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
    manifest = {"source": source.label, "sha256": sha, "files": files}
    if todo or old.get("sha256") != sha:
        tmp = manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest))
        os.replace(tmp, manifest_path)  # last: a copy interrupted before this is redone
    report = CacheReport(source=source.label, local=str(local), sha256=sha, files=len(files),
                         bytes=sum(f["size"] for f in files.values()), copied_files=len(todo),
                         copy_seconds=round(time.perf_counter() - started, 3))
    log.info("data cached" if todo else "data cache reused", **asdict(report))
    return report


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
