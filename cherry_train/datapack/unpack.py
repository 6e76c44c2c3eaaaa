"""Unpacking: the files a worker still needs, read at their recorded offsets from a few shards
at a time, each checked against its sha256 as it is written."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import structlog

from cherry_train.datapack.index import INDEX, UNPACK_THREADS, PackError, PackIndex, PackPlace
from cherry_train.safepaths import UnsafePath, inside, plain_name

log = structlog.get_logger(__name__)

def unpack(index: PackIndex, place: PackPlace, wanted: Iterable[str], target: Path,
           scratch: Path, progress: Callable[[int], None] | None = None) -> dict[str, str]:
    """Extract the `wanted` files into `target` (rel paths kept), each checked by size and
    sha256 against the index; returns rel -> sha256 of those extracted. A shard that cannot be
    read, or a file that fails its check, raises PackError: the caller copies what is left
    file by file. A prepared pack is never unpacked: its images are re-encoded for one image
    size, and the reader (reader.py) checks that a job's size is served before using them."""
    if index.prepared is not None:
        raise PackError(f"{place.description} is a prepared pack (images re-encoded at short "
                        f"side {index.prepared['short_side']}): read in place, not unpacked "
                        "as the originals")
    by_shard: dict[str, set[str]] = {}
    for rel in wanted:
        by_shard.setdefault(index.files[rel]["shard"], set()).add(rel)
    for shard in by_shard:  # a shard is downloaded into scratch under its name
        try:
            plain_name(shard, f"{place.description}/{INDEX}")
        except UnsafePath as e:
            raise PackError(str(e)) from None
    scratch.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(UNPACK_THREADS) as pool:
        parts = pool.map(lambda item: _unpack_shard(index, place, item[0], item[1], target,
                                                    scratch, progress), by_shard.items())
        return {rel: sha for part in parts for rel, sha in part.items()}


def _unpack_shard(index: PackIndex, place: PackPlace, shard: str, wanted: set[str],
                  target: Path, scratch: Path, progress) -> dict[str, str]:
    """Read the shard once, front to back, writing the wanted files: each file's bytes are at
    its offset (no tar parsing), each checked against its length and sha256 as it is written.
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
                path = _target(target, rel, place, shard)
                if path.parent not in made:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    made.add(path.parent)
                h = hashlib.sha256()
                left = entry["length"]
                with open(path, "wb") as out:
                    while left:
                        chunk = f.read(min(left, 4 << 20))
                        if not chunk:
                            raise PackError(f"shard {shard} ends inside {rel}")
                        h.update(chunk)
                        out.write(chunk)
                        left -= len(chunk)
                at = entry["offset"] + entry["length"]
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


def _target(target: Path, rel: str, place: PackPlace, shard: str) -> Path:
    """Where a file of an index goes: inside the target (an index is data, not trusted)."""
    try:
        return inside(target, rel, f"{place.description}/{shard}")
    except UnsafePath as e:
        raise PackError(str(e)) from None
