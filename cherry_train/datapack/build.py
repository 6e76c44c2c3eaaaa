"""Building a pack: list the folder, plan shards of about SHARD_BYTES, write each (hashing every
file as it is packed) and read it back, then the index, last."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import structlog

from cherry_train import faults
from cherry_train.datapack.index import (
    INDEX,
    PACK_SUFFIX,
    SHARD_BYTES,
    TAR_OVERHEAD,
    FolderPackPlace,
    Hashing,
    PackError,
    PackIndex,
    PackPlace,
)
from cherry_train.safepaths import walk_files

log = structlog.get_logger(__name__)

LIST_THREADS = 16
LIST_CHUNK = 64


def list_folder(folder: Path, stat=os.stat, scan=None,
                say_links: bool = True) -> dict[str, tuple[int, int]]:
    """rel path -> (size, mtime_ns) of every file below `folder`, hidden ones left out, and no
    symbolic link followed (safepaths.walk_files): the log says how many were skipped. `scan`
    lists one folder (retried, on a mount)."""
    walk = walk_files(folder, scan)
    if walk.links and say_links:
        log.warning(f"data folder {folder}: {walk.skipped()}", folder=str(folder),
                    links=len(walk.links), first=walk.links[0])
    paths = [folder / rel for rel in walk.files]

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
    return dict(zip(walk.files, found, strict=True))


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
    if list_folder(folder, say_links=False) != listing:
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
                    hashing = Hashing(f)
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


