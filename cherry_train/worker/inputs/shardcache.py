"""A prepared data pack read in place: its shard files copied whole into the cache (a few large
files, one request each on Drive, every sample's sha256 checked once), and the samples read at
their offsets from there (datapack.PackedFiles): no file per image on this VM's disk.

Used when a folder's pack is prepared (images re-encoded at a short side), current (made from
exactly the folder's files), and large enough for the job's stored side. Anything else (a pack
for a smaller side, a stale one, a broken one: corrupt shard, a sample that is no image) is
one line naming the pack and what to do, and the job trains from the original files as
before: no job fails for a broken pack while the originals are readable.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from cherry_train import datapack
from cherry_train.files import write_atomic
from cherry_train.sizes import human_bytes
from cherry_train.worker.inputs.gpustream import jpeg_size

log = structlog.get_logger(__name__)

PREPARED_DIR = "prepared"  # in a cache entry: the shards and LOCAL_INDEX
#: The verified index of the shards beside it; a folder holding it is read through the pack
#: (data.py). A hidden name: it can be no class folder and no image of a user's own folder.
LOCAL_INDEX = ".cherry-prepared.json"
JPEG_END = b"\xff\xd9"  # a cut JPEG has none: 0xff in coded data is always followed by 0
JPEG_TAIL = 4096  # where the end marker may be: some cameras pad after it


@dataclass(frozen=True)
class Wanted:
    """What the job needs of a pack: its data.image_size and augmentation.min_crop_scale."""

    image_size: int
    min_crop_scale: float


@dataclass
class InPlace:
    local: Path
    sha256: str  # of the samples the job reads (rel and stored sha256 of each)
    files: int
    bytes: int  # the shards' bytes on this disk
    copied_bytes: int  # of them, copied by this call (0: the local shards were reused)
    copied_files: int


def fetch_prepared(index: datapack.PackIndex, place: datapack.PackPlace, listing: dict,
                   entry: Path, wanted: Wanted, folder: str, progress=None) -> InPlace | None:
    """The pack's shards in `entry`/prepared, checked, or None (said in one line) when the job
    trains from the original files instead."""
    refusal = _refusal(index, listing, wanted, folder)
    if refusal is not None:
        log.warning(f"{refusal}; training from the original files", pack=place.description)
        return None
    target = entry / PREPARED_DIR
    local_index = target / LOCAL_INDEX
    started = time.perf_counter()
    try:
        local_index.unlink(missing_ok=True)  # the folder is a pack again only once checked
        fetched = datapack.fetch_shards(index, place, target, entry / "fetch", progress,
                                        check=_check_image)
    except datapack.PackError as e:
        log.warning(f"data pack not used: {e}; training from the original files",
                    pack=place.description)
        shutil.rmtree(target, ignore_errors=True)
        return None
    write_atomic(local_index, index.to_json())  # last: the folder now reads as a pack
    result = InPlace(local=target, sha256=samples_sha256(index), files=len(index.files),
                     bytes=index.bytes, copied_bytes=fetched.bytes,
                     copied_files=sum(index.shards[n]["files"] for n in fetched.fetched))
    log.info("data pack fetched: samples read in place from its shards" if fetched.fetched
             else "data pack reused: samples read in place from its shards",
             pack=place.description, shards=len(index.shards), samples=result.files,
             size=human_bytes(result.bytes), originals=human_bytes(index.source_bytes),
             short_side=index.prepared["short_side"],
             seconds=round(time.perf_counter() - started, 2))
    return result


def _refusal(index: datapack.PackIndex, listing: dict, wanted: Wanted, folder: str) -> str | None:
    """Why this pack cannot stand in for the folder, or None."""
    refusal = index.refusal(wanted.image_size, wanted.min_crop_scale, folder)
    if refusal is not None:
        return refusal
    if not index.is_current(listing):
        return (f"data pack of {folder} is older than the folder (files added, changed or "
                f"removed since): rebuild it with `cherry data pack {folder} --image-size "
                f"{wanted.image_size}`")
    if index.skipped:
        first = sorted(index.skipped)[0]
        return (f"data pack of {folder} leaves out {len(index.skipped)} file(s) that do not "
                f"decode as images (first: {first}): remove or replace them, then rebuild it")
    return None


def _check_image(rel: str, entry: dict, data: bytes) -> None:
    """A sample a whole JPEG of the size the index says: its frame header and its end marker,
    looked at as the shard passes (microseconds each; a full decode of every sample would cost
    the minutes the pack saves). Catches a builder's garbage, which its sha256 does not."""
    size = jpeg_size(data)
    if size is None or size != (entry["width"], entry["height"]) or \
            JPEG_END not in data[-JPEG_TAIL:]:
        raise datapack.PackError(
            f"{rel} in shard {entry['shard']} is not a whole JPEG of {entry['width']}x"
            f"{entry['height']} (a damaged or mis-built pack): rebuild the pack")


def samples_sha256(index: datapack.PackIndex) -> str:
    h = hashlib.sha256()
    for rel in sorted(index.files):
        h.update(f"{rel}\0{index.files[rel]['sha256']}\n".encode())
    return h.hexdigest()


def local_pack(folder: Path) -> tuple[datapack.PackedFiles, list[str]] | None:
    """A prepared folder of the cache (fetch_prepared's): its samples' reader and their
    names; None for an ordinary folder."""
    marker = folder / LOCAL_INDEX
    if not marker.is_file():
        return None
    index = datapack.PackIndex.from_json(marker.read_bytes())
    return datapack.PackedFiles(index, folder), list(index.files)
