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
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import platformdirs
import structlog

from cherry_train import datapack
from cherry_train.datapack.prepare import UNRECORDED_CHROMA
from cherry_train.files import write_atomic
from cherry_train.places import on_colab
from cherry_train.safepaths import UnsafePath, check_inside
from cherry_train.sizes import human_bytes
from cherry_train.worker.errors import JobError
from cherry_train.worker.inputs.shardcache import InPlace, Wanted, fetch_prepared
from cherry_train.worker.inputs.sources import LocalSource, Source

log = structlog.get_logger(__name__)

MANIFEST = ".cherry-dataset.json"
COPY_THREADS = 16  # I/O bound: the mount answers many requests at once much faster than one
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
    #: How the data came: "prepared" (a prepared pack's shards, read in place), "verbatim"
    #: (files unpacked from a pack), "files" (copied one by one, or the cached copy reused).
    way: str = "files"
    copied_bytes: int = 0  # what this call copied onto this disk


def default_cache_dir() -> Path:
    if os.environ.get("CHERRY_CACHE_DIR"):
        return Path(os.environ["CHERRY_CACHE_DIR"])
    if on_colab():
        return Path("/content/cherry-cache")  # the VM's local disk, not the Drive mount
    return platformdirs.user_cache_path("cherry-train") / "datasets"


def _entry(cache_dir: Path, source: Source) -> Path:
    key = hashlib.sha1(source.label.encode()).hexdigest()[:12]
    return cache_dir / f"{source.name.split('.')[0][:40]}-{key}"


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
                 pack: str = "auto", wanted: Wanted | None = None) -> CacheReport:
    """Make (or refresh, or reuse) the local copy of one data folder or archive. `pack`
    (data.pack): whether to unpack the folder's data pack and build one (datapack.py).
    `wanted` (a training job's image size): a prepared pack that serves it is fetched and read
    in place (shardcache.py) instead of a copy of the files."""
    source = source if isinstance(source, Source) else LocalSource(source)
    if not source.exists():
        raise JobError(f"data: {source.label} does not exist")
    entry = _entry(cache_dir, source)
    with _locked(entry):
        return _cache(source, entry, progress, pack, wanted)


def _cache(source: Source, entry: Path, progress: bool, pack: str = "auto",
           wanted: Wanted | None = None) -> CacheReport:
    started = time.perf_counter()
    manifest_path = entry / MANIFEST
    try:
        old = json.loads(manifest_path.read_text())
    except (FileNotFoundError, ValueError):
        old = {"files": {}}
    files_dir = entry / "files"
    listing = _listing(source, files_dir)
    place = source.pack_place() if pack != "off" and not source.is_archive() else None
    index, looked = None, False  # the index is read once: a broken one is said once
    if place is not None and wanted is not None:
        index, looked = _index(place), True
        index = _refreshed(source, index, place, pack, listing, entry, wanted, progress)
        fetched = _fetched(source, index, place, listing, entry, wanted, progress)
        if fetched is not None:
            return _in_place(source, fetched, started)
    files, todo = _unchanged(old["files"], listing, files_dir)
    copied_bytes = sum(size for _, size, _ in todo)  # unpacked or copied one by one
    unpacked = 0
    if todo and place is not None and not looked:
        index, looked = place.index(), True
    if todo and index is not None and index.prepared is None:  # re-encoded bytes are no copy
        unpacked, todo = _unpack(index, place, todo, files, files_dir, entry, progress)
    if todo:
        _copy_all(source, todo, files, files_dir, progress)
    sha = _dataset_sha256(files)
    local = files_dir
    if source.is_archive():
        local = _extract(files_dir / source.name, entry / "extracted", sha,
                         fresh=bool(todo) or old.get("sha256") != sha)
    copied = len(todo) + unpacked
    pack_state = fingerprint = None
    if place is not None:
        fingerprint = _fingerprint(listing)
        pack_state = _pack_state(source, place, pack, index, looked, listing, files, files_dir,
                                 entry, fingerprint == old.get("pack_fingerprint"), progress)
    manifest = {"source": source.label, "sha256": sha, "files": files,
                "pack_fingerprint": fingerprint if pack_state else None}
    if copied or old.get("sha256") != sha or \
            old.get("pack_fingerprint") != manifest["pack_fingerprint"]:
        # Last: a copy interrupted before this is redone.
        write_atomic(manifest_path, json.dumps(manifest).encode())
    report = CacheReport(source=source.label, local=str(local), sha256=sha, files=len(files),
                         bytes=sum(f["size"] for f in files.values()), copied_files=copied,
                         copy_seconds=round(time.perf_counter() - started, 3),
                         unpacked_files=unpacked, pack=pack_state,
                         way="verbatim" if unpacked else "files",
                         copied_bytes=copied_bytes)
    log.info("data cached" if copied else "data cache reused", **asdict(report))
    return report


def _listing(source: Source, files_dir: Path) -> dict[str, tuple[int, int]]:
    listing = source.listing()
    if not listing:
        raise JobError(f"data: {source.label} is empty")
    for rel in listing:  # before anything is written: every file stays inside the cache
        try:
            check_inside(files_dir, rel, f"data: {source.label}")
        except UnsafePath as e:
            raise JobError(str(e)) from None
    return listing


def _index(place: datapack.PackPlace) -> datapack.PackIndex | None:
    """The folder's pack index; None when it has none, or when it cannot be read (said, with
    what to do: the job trains from the original files)."""
    try:
        return place.load_index()
    except datapack.PackError as e:
        log.warning(f"data pack not used: {e}; training from the original files",
                    pack=place.description)
        return None


def _refreshed(source: Source, index: datapack.PackIndex | None, place: datapack.PackPlace,
               pack: str, listing: dict, entry: Path, wanted: Wanted,
               progress: bool) -> datapack.PackIndex | None:
    """A prepared pack older than its folder (photos added, changed or removed since it was
    made), rebuilt here with the settings it was made with: only the new and changed images are
    re-encoded, the rest taken from its shards, so a few photos added on Drive cost seconds and
    not a job trained from full-size originals. Where no pack can be built (an API root is read
    only), or the build fails, the stale pack stays, and shardcache says what to do."""
    if index is None or index.prepared is None or pack == "off" or \
            not source.can_build_pack() or index.is_current(listing) or \
            index.refusal(wanted.image_size, wanted.min_crop_scale, source.label) is not None:
        return index
    made = index.prepared
    encoding = datapack.Encoding(made["short_side"], made["quality"],
                                 made.get("chroma", UNRECORDED_CHROMA))
    made_for = {k: made[k] for k in ("image_size", "min_crop_scale") if k in made}
    kept = len(index.matching(listing))
    started = time.perf_counter()
    bar = _bar(progress, len(listing), f"refreshing the pack of {source.name}")
    try:
        fresh = datapack.build_pack(source.path, listing, place, entry / "pack", source.label,
                                    progress=bar.update if bar is not None else None,
                                    encoding=encoding, prepared_for=made_for, old=index)
    except (OSError, datapack.PackError) as e:
        log.warning("data pack not refreshed", pack=place.description,
                    error=f"{type(e).__name__}: {e}")
        return index
    finally:
        if bar is not None:
            bar.close()
    log.info("data pack refreshed: the folder changed since it was made", pack=place.description,
             encoded=len(listing) - kept, reused=kept,
             seconds=round(time.perf_counter() - started, 1))
    return fresh


def _fetched(source: Source, index: datapack.PackIndex | None, place: datapack.PackPlace,
             listing: dict, entry: Path, wanted: Wanted, progress: bool) -> InPlace | None:
    """A prepared pack's shards, fetched to be read in place; None: the files are copied."""
    if index is None or index.prepared is None:
        return None
    bar = _bar(progress, len(index.files), f"shards of {source.name}")
    try:
        return fetch_prepared(index, place, listing, entry, wanted, source.label,
                              bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()


def _in_place(source: Source, fetched: InPlace, started: float) -> CacheReport:
    report = CacheReport(source=source.label, local=str(fetched.local), sha256=fetched.sha256,
                         files=fetched.files, bytes=fetched.bytes,
                         copied_files=fetched.copied_files,
                         copy_seconds=round(time.perf_counter() - started, 3), pack="current",
                         way="prepared", copied_bytes=fetched.copied_bytes)
    log.info("data cached" if fetched.copied_files else "data cache reused", **asdict(report))
    return report


def _unchanged(known: dict[str, dict], listing: dict[str, tuple[int, int]],
               files_dir: Path) -> tuple[dict[str, dict], list]:
    """The files kept as they are (same path, size and mtime, present here), and the rest to
    copy; files deleted at the source go here too."""
    files: dict[str, dict] = {}
    todo = []
    for rel, (size, mtime) in listing.items():
        entry = known.get(rel)
        if entry and entry["size"] == size and entry["mtime_ns"] == mtime and \
                (files_dir / rel).is_file():
            files[rel] = entry
        else:
            todo.append((rel, size, mtime))
    for rel in set(known) - set(listing):
        (files_dir / rel).unlink(missing_ok=True)
    return files, todo


def _copy_all(source: Source, todo: list, files: dict, files_dir: Path, progress: bool) -> None:
    """Copy the files in `todo` from the source, many at a time, recording each in `files`."""
    bar = _bar(progress, len(todo), source.name)
    with ThreadPoolExecutor(COPY_THREADS) as pool:
        digests = pool.map(lambda t: source.copy(t[0], files_dir / t[0], t[1]), todo)
        for (rel, size, mtime), digest in zip(todo, digests, strict=True):
            files[rel] = {"size": size, "mtime_ns": mtime, "sha256": digest}
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()


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
                index: datapack.PackIndex | None, looked: bool, listing: dict, files: dict,
                files_dir: Path, entry: Path, known_current: bool,
                progress: bool) -> str | None:
    """"current" when the folder's pack matches it, "built" when this call built it, None when
    it has none (and need not, or cannot, have one). A failed build is logged; the job goes on."""
    if known_current:
        return "current"  # checked when this cache was last filled; the folder is unchanged
    if not looked:
        index = place.index()
    if index is not None and index.is_current(listing):
        return "current"
    if index is not None and index.prepared is not None:
        return None  # prepared: refreshed for training jobs (_refreshed), else left as it is
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
