"""Building a pack: list the folder, store every file (as it is, or re-encoded for training: by
Pillow in a process pool, or by torchvision on a GPU) into shards of about SHARD_BYTES, each
read back and checked, then the index, last. A rebuild of a prepared pack takes the unchanged
images' stored bytes from the old one."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO

import structlog

from cherry_train import faults
from cherry_train.datapack.gpuencode import BATCH, DeviceEncoder, encoder_name
from cherry_train.datapack.index import (
    INDEX,
    PACK_SUFFIX,
    SHARD_BYTES,
    TAR_OVERHEAD,
    FolderPackPlace,
    PackError,
    PackIndex,
    PackPlace,
)
from cherry_train.datapack.prepare import UNRECORDED_CHROMA, Encoding, Prepared, dims, prepare_file
from cherry_train.datapack.reader import PackedFiles, fetch_shards
from cherry_train.safepaths import walk_files

log = structlog.get_logger(__name__)

LIST_THREADS = 16
LIST_CHUNK = 64
LOCAL_STAT_SECONDS = 0.0002  # a stat faster than this is no round trip: listed in one thread
READ_THREADS = 8  # files read at once for a verbatim pack (on a mount: round trips)
AHEAD = 64  # samples read or encoded ahead of the shard writer
#: Files read at once for a build on a GPU: it decodes a batch faster than a Drive mount
#: delivers one file after another, so more round trips are kept in flight, and a second
#: batch is read while the first is on the device.
DEVICE_READ_THREADS = 16


def list_folder(folder: Path, stat=os.stat, scan=None,
                say_links: bool = True) -> dict[str, tuple[int, int]]:
    """rel path -> (size, mtime_ns) of every file below `folder`, hidden ones left out, and no
    symbolic link followed (safepaths.walk_files): the log says how many were skipped. `scan`
    lists one folder (retried, on a mount)."""
    walk = walk_files(folder, scan)
    if walk.links and say_links:
        log.warning(f"data folder {folder}: {walk.skipped()}", folder=str(folder),
                    links=len(walk.links), first=walk.links[0])
    base = str(folder)  # plain strings: 60,000 Path objects cost more than the stats
    paths = [f"{base}/{rel}" for rel in walk.files]

    def sizes_and_times(chunk: list[str]) -> list[tuple[int, int]]:
        found = []
        for path in chunk:
            faults.slow("stat")
            st = stat(path)
            found.append((st.st_size, st.st_mtime_ns))
        return found

    # On a network mount each stat is a round trip: many at once hide the latency. On a local
    # disk (or a mount answering from its cache) threads only hand the GIL around: 60,000
    # stats take 0.2 s one after another, 1-2 s on 16 threads. The first chunk tells which.
    chunks = [paths[i:i + LIST_CHUNK] for i in range(0, len(paths), LIST_CHUNK)]
    started = time.perf_counter()
    found = sizes_and_times(chunks[0]) if chunks else []
    if time.perf_counter() - started < len(found) * LOCAL_STAT_SECONDS:
        found += [s for chunk in chunks[1:] for s in sizes_and_times(chunk)]
    else:
        with ThreadPoolExecutor(LIST_THREADS) as pool:
            found += [s for part in pool.map(sizes_and_times, chunks[1:]) for s in part]
    return dict(zip(walk.files, found, strict=True))


def pack_folder(folder: Path, shard_bytes: int = SHARD_BYTES, scratch: Path | None = None,
                progress: bool = False, encoding: Encoding | None = None,
                prepared_for: dict | None = None,
                device: str | None = None) -> tuple[PackIndex, PackPlace, bool]:
    """`cherry data pack PATH`: build (or rebuild) the pack beside a folder on this machine,
    verbatim or, with `encoding`, prepared (`prepared_for`: what it was made for, kept in the
    index; `device`: as build_pack's); returns its index, where it is, and whether it was built
    (False: it was current)."""
    import tempfile

    folder = Path(folder).resolve()
    place = FolderPackPlace(folder.parent / f"{folder.name}{PACK_SUFFIX}")
    listing = list_folder(folder)
    if not listing:
        raise PackError(f"{folder} holds no files")
    index = place.index()
    if index is not None and index.is_current(listing) and \
            _same_encoding(index.prepared, encoding):
        return index, place, False
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(listing), desc=f"packing {folder.name}", unit="file")
    try:
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            index = build_pack(folder, listing, place, Path(tmp), str(folder),
                               shard_bytes=shard_bytes,
                               progress=bar.update if bar is not None else None,
                               encoding=encoding, prepared_for=prepared_for, old=index,
                               device=device)
    finally:
        if bar is not None:
            bar.close()
    if list_folder(folder, say_links=False) != listing:
        raise PackError(f"{folder} changed while it was packed; pack again")
    return index, place, True


def _same_encoding(prepared: dict | None, encoding: Encoding | None) -> bool:
    """Whether a pack's images are stored as `encoding` asks. The encoder is no part of it: a
    pack built by Pillow or by torchvision on a GPU has the same image sizes, baseline JPEG at
    the same quality and chroma, and serves training alike (their pixels differ by resampling,
    as two JPEG encoders' do), so a build on the other device re-encodes only what changed,
    and a current pack is kept, whoever built it."""
    if prepared is None or encoding is None:
        return prepared is None and encoding is None
    chroma = prepared.get("chroma", UNRECORDED_CHROMA)
    return (prepared["short_side"], prepared["quality"], chroma) == \
        (encoding.short_side, encoding.quality, encoding.chroma)


def build_pack(folder: Path, listing: dict[str, tuple[int, int]], place: PackPlace,
               scratch: Path, label: str, known: dict[str, str] | None = None,
               shard_bytes: int = SHARD_BYTES,
               progress: Callable[[int], None] | None = None,
               encoding: Encoding | None = None, prepared_for: dict | None = None,
               old: PackIndex | None = None, device: str | None = None) -> PackIndex:
    """Pack `folder`'s files (`listing`: rel -> (size, mtime_ns), as the source reports them)
    into shards stored at `place`, then the index; returns it. Verbatim without `encoding`
    (`known`: sha256s already verified, checked again as each file is read); with it, each image
    re-encoded (prepare.py), those that do not decode left out and listed in the index, and
    the stored bytes of images unchanged since `old` (a prepared pack of the same encoding)
    taken from it instead; `device` None encodes with Pillow in a process pool, a torch device
    ("cuda") with torchvision there (gpuencode.py). Each shard is read back and checked before
    the index names it."""
    scratch.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(place, scratch, shard_bytes)
    skipped: dict[str, dict] = {}
    if old is not None and not _same_encoding(old.prepared, encoding):
        old = None
    try:
        samples = _verbatim(folder, listing, known or {}) if encoding is None else \
            _prepared(folder, listing, encoding, old, place, scratch, device)
        for sample in samples:
            size, mtime = listing[sample.rel]
            if sample.read != size:
                raise PackError(f"{folder / sample.rel} changed while it was packed; "
                                "pack again")
            if sample.data is None:
                log.warning(f"{folder / sample.rel} does not decode as an image "
                            f"({sample.error}): left out of the pack; remove or replace it")
                skipped[sample.rel] = {"size": size, "mtime_ns": mtime, "error": sample.error}
            else:
                writer.add(sample, size, mtime)
            if progress is not None:
                progress(1)
        writer.finish()
    finally:
        writer.discard()
    if not writer.files:
        raise PackError(f"no file of {folder} decodes as an image: nothing to pack")
    prepared = None if encoding is None else {
        **(prepared_for or {}), "short_side": encoding.short_side,
        "quality": encoding.quality, "chroma": encoding.chroma, "encoder": _encoder(device)}
    index = PackIndex(source=label, files=writer.files, shards=writer.shards,
                      prepared=prepared, skipped=skipped)
    tmp = scratch / f"{INDEX}.{os.getpid()}"
    tmp.write_bytes(index.to_json())
    try:
        place.put(INDEX, tmp)  # last: only now does the pack exist for readers
    finally:
        tmp.unlink(missing_ok=True)
    for name in place.names():  # shards of an earlier pack, and leftovers of cut builds
        if name != INDEX and name not in writer.shards:
            place.delete(name)
    return index


def _encoder(device: str | None) -> str:
    """The encoder of this build's images (those reused from an older pack keep theirs, which
    may be the other one: see _same_encoding)."""
    if device is not None:
        return encoder_name(device)
    import PIL

    return f"Pillow {PIL.__version__}"


def _verbatim(folder: Path, listing: dict, known: dict[str, str]) -> Iterator[Prepared]:
    """The files as they are, in path order, with their width and height where they are
    images (read a few at a time: on a mount each open is a round trip)."""
    def read(rel: str) -> Prepared:
        data = (folder / rel).read_bytes()
        if rel in known and hashlib.sha256(data).hexdigest() != known[rel]:
            raise PackError(f"{folder / rel} differs from the copy that was checked; "
                            "pack again")
        return Prepared(rel, len(data), data, *dims(data))

    with ThreadPoolExecutor(READ_THREADS) as pool:
        yield from _in_order(pool, read, sorted(listing))


def _prepared(folder: Path, listing: dict, encoding: Encoding, old: PackIndex | None,
              place: PackPlace, scratch: Path, device: str | None) -> Iterator[Prepared]:
    """The images re-encoded, in path order: those the old pack holds unchanged from its
    shards (checked against their sha256), the rest encoded (_fresh)."""
    reuse = old.matching(listing) if old is not None else set()
    stored = None
    if reuse:
        local = getattr(place, "path", None)
        if local is None:  # a storage root: its old shards come here first
            local = scratch / "old"
            try:
                fetch_shards(old, place, local, scratch / "download",
                             shards={old.files[rel]["shard"] for rel in reuse})
            except PackError as e:
                log.warning(f"the old pack cannot be reused ({e}): every image is encoded "
                            "again", pack=place.description)
                reuse = set()
        stored = PackedFiles(old, local) if reuse else None
    todo = [rel for rel in sorted(listing) if rel not in reuse]
    try:
        with ExitStack() as running:
            fresh = _fresh(running, folder, todo, encoding, device)
            for rel in sorted(listing):
                if rel not in reuse:
                    yield next(fresh)
                else:  # a damaged old pack costs an encode here, never the build
                    yield _reused(stored, rel, listing[rel][0]) or \
                        prepare_file(folder, encoding, rel)
    finally:
        if stored is not None:
            stored.close()


def _fresh(running: ExitStack, folder: Path, todo: list[str], encoding: Encoding,
           device: str | None) -> Iterator[Prepared]:
    """`todo`'s images encoded, in order: by Pillow in a process pool over this machine's
    cores (its decode and encode hold the GIL), or, on a device, read by threads and encoded
    there in batches (gpuencode.py); `running` closes the pool."""
    if device is None:
        pool = running.enter_context(ProcessPoolExecutor(max(1, min(_cores(), len(todo)))))
        return _in_order(pool, prepare_file, todo, folder, encoding)
    encoder = DeviceEncoder(encoding, device)
    try:
        encoder.probe()  # the pack records its chroma: the device's encoder must store that
    except RuntimeError as e:
        raise PackError(f"cannot prepare on {device}: {e}; --device cpu prepares with "
                        "Pillow") from None
    pool = running.enter_context(ThreadPoolExecutor(DEVICE_READ_THREADS))
    raw = _in_order(pool, _read, todo, folder, ahead=2 * BATCH)
    return encoder.prepare(zip(todo, raw, strict=True))


def _read(folder: Path, rel: str) -> bytes:
    return (folder / rel).read_bytes()


def _in_order(pool: Executor, fn: Callable, items: list, *args,
              ahead: int = AHEAD) -> Iterator:
    """fn(*args, item) for each item, in order, at most `ahead` in flight: Executor.map submits
    every item at once, and its results (whole files) would pile up in memory."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, *args, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _cores() -> int:
    """The cores this process may run on (`taskset -c 0,1` gives 2 on a big machine)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _reused(stored: PackedFiles, rel: str, size: int) -> Prepared | None:
    """The old pack's stored bytes of `rel`, checked; None (logged) if they fail."""
    f = stored.index.files[rel]
    try:
        data = stored.read(rel)
    except (OSError, PackError) as e:
        data, why = None, f"{type(e).__name__}: {e}"
    else:
        why = "it does not match its sha256 in the index"
    if data is None or hashlib.sha256(data).hexdigest() != f["sha256"]:
        log.warning(f"{rel} in the old pack's shard {f['shard']} cannot be reused ({why}): "
                    "encoded again from the original", pack=str(stored.folder))
        return None
    return Prepared(rel, size, data, f["width"], f["height"])


class _ShardWriter:
    """Samples appended in path order to plain tar shards (`tar xf` opens them) of about
    `shard_bytes`; each stored at the place under its content's name, read back and checked."""

    def __init__(self, place: PackPlace, scratch: Path, shard_bytes: int):
        self.place, self.scratch, self.shard_bytes = place, scratch, shard_bytes
        self.tmp = scratch / f"shard.{os.getpid()}.tar"
        self.files: dict[str, dict] = {}
        self.shards: dict[str, dict] = {}
        self._tar: tarfile.TarFile | None = None
        self._open: list[dict] = []
        self._size = 0

    def add(self, sample: Prepared, size: int, mtime: int) -> None:
        cost = len(sample.data) + TAR_OVERHEAD
        if self._tar is not None and self._size + cost > self.shard_bytes:
            self.finish()
        if self._tar is None:
            # Closed in finish(), or in discard() after an error.
            self._tar = tarfile.open(self.tmp, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
            self._open, self._size = [], 0
        info = tarfile.TarInfo(sample.rel)
        info.size, info.mtime, info.mode = len(sample.data), mtime / 1e9, 0o644
        self._tar.addfile(info, io.BytesIO(sample.data))
        # addfile leaves tar.offset after the data, padded to whole 512-byte blocks.
        offset = self._tar.offset - -(-len(sample.data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        entry = {"size": size, "mtime_ns": mtime, "shard": None, "offset": offset,
                 "length": len(sample.data), "sha256": hashlib.sha256(sample.data).hexdigest(),
                 "width": sample.width, "height": sample.height}
        self.files[sample.rel] = entry
        self._open.append(entry)
        self._size += cost

    def finish(self) -> None:
        """Close the shard being written, store it under its content's name, read it back."""
        if self._tar is None:
            return
        self._tar.close()
        self._tar = None
        sha = _file_sha256(self.tmp)
        name = f"shard-{sha[:20]}.tar"
        length = self.tmp.stat().st_size
        self.place.put(name, self.tmp)
        self.tmp.unlink()
        with self.place.open(name, self.scratch) as f:  # read back: what a worker will read
            if _stream_sha256(f) != sha:
                raise PackError(f"shard {name} differs from what was written to "
                                f"{self.place.description}")
        self.shards[name] = {"bytes": length, "sha256": sha, "files": len(self._open)}
        for entry in self._open:
            entry["shard"] = name

    def discard(self) -> None:
        """After an error: the shard being written goes."""
        if self._tar is not None:
            self._tar.close()
        self.tmp.unlink(missing_ok=True)


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return _stream_sha256(f)


def _stream_sha256(f: BinaryIO) -> str:
    h = hashlib.sha256()
    while chunk := f.read(8 << 20):
        h.update(chunk)
    return h.hexdigest()


