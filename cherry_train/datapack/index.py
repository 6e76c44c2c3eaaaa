"""A pack's format and where it lives: the index (every file: the original's size and mtime,
its stored bytes' shard, offset, length and sha256, the stored image's size) and the places that
hold shards (a folder here, or a storage root)."""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import structlog

from cherry_train import faults, files
from cherry_train.schemas.config import AugmentationSection
from cherry_train.sizes import stored_side

log = structlog.get_logger(__name__)

PACK_SUFFIX = ".cherry-pack"
INDEX = "index.json"
#: 2: prepared packs (images re-encoded at the side training stores), every sample's stored
#: length, sha256 and width/height. Format-1 indexes are refused, not read as verbatim packs:
#: they lack what the in-place reader needs (lengths, image sizes), a refused index makes the
#: worker copy file by file (never a failed job), and `cherry data pack` or a worker with
#: data.pack: on rebuilds it once, so one format is all any reader has to know.
FORMAT = 2
SHARD_BYTES = 256 << 20
TAR_OVERHEAD = 1024  # a header and padding per file
#: `data.pack: auto` builds a pack for folders with at least this many files: below it, the
#: file-by-file copy takes seconds even through the mount.
AUTO_MIN_FILES = 2000
#: Modification times are compared to the second: Drive keeps milliseconds, local disks keep
#: nanoseconds, and the same file seen through each must still match.
MTIME_TOLERANCE_NS = 1_000_000_000
UNPACK_THREADS = 4  # shards are large: a few at a time keep the link busy
_HEX = frozenset("0123456789abcdef")
#: What a config that does not say gets (the rebuild line names another one).
DEFAULT_MIN_CROP_SCALE = AugmentationSection.model_fields["min_crop_scale"].default


class PackError(Exception):
    """A pack that cannot be used (unreadable index, a file that fails its check)."""


@dataclass
class PackIndex:
    """What a pack holds. Per file: the original's size and mtime (to notice changes), where its
    stored bytes are (shard, offset, length), their sha256, and the stored image's width and
    height (None for a verbatim file Pillow cannot read). `prepared`: None for a verbatim pack
    (the files as they are), else how the images were re-encoded ({"short_side", "quality",
    "chroma", "image_size", "min_crop_scale", "encoder"}). `skipped`: files of the folder that
    did not decode and are not in a prepared pack (rel -> {"size", "mtime_ns", "error"})."""

    source: str
    files: dict[str, dict]
    shards: dict[str, dict]  # name -> {"bytes" (the shard file's length), "sha256", "files"}
    prepared: dict | None = None
    skipped: dict[str, dict] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    format: int = FORMAT

    @property
    def bytes(self) -> int:
        """What the pack takes (and what a worker downloads)."""
        return sum(s["bytes"] for s in self.shards.values())

    @property
    def source_bytes(self) -> int:
        """What the originals take."""
        return sum(f["size"] for f in self.files.values()) + \
            sum(f["size"] for f in self.skipped.values())

    def to_json(self) -> bytes:
        return json.dumps({"format": self.format, "source": self.source,
                           "created_at": self.created_at, "prepared": self.prepared,
                           "shards": self.shards, "files": self.files,
                           "skipped": self.skipped}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> PackIndex:
        """The index, checked: it comes from a shared folder, and a reader trusts its offsets
        and lengths (PackError says what is wrong)."""
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise PackError(f"not JSON, truncated or damaged ({e})") from None
        if not isinstance(data, dict):
            raise PackError("not a pack index")
        if data.get("format") != FORMAT:
            made = "an older cherry-train, before prepared packs" \
                if data.get("format") == 1 else "another version of cherry-train"
            raise PackError(f"pack format {data.get('format')!r} (made by {made}); this one "
                            f"reads format {FORMAT}")
        try:
            index = cls(source=str(data["source"]), files=data["files"], shards=data["shards"],
                        prepared=data["prepared"], skipped=data.get("skipped") or {},
                        created_at=float(data["created_at"]))
            index._check()
        except (KeyError, TypeError, ValueError) as e:
            raise PackError(f"not a valid pack index ({type(e).__name__}: {e})") from None
        return index

    def _check(self) -> None:
        def count(v) -> int:
            if type(v) is not int or v < 0:
                raise ValueError(f"{v!r} is not a count")
            return v

        def sha(v) -> None:
            if not isinstance(v, str) or len(v) != 64 or not set(v) <= _HEX:
                raise ValueError(f"{v!r} is not a sha256")

        for shard in self.shards.values():
            count(shard["bytes"]), count(shard["files"]), sha(shard["sha256"])
        for rel, f in self.files.items():
            count(f["size"]), count(f["mtime_ns"]), sha(f["sha256"])
            shard = self.shards[f["shard"]]
            if count(f["offset"]) + count(f["length"]) > shard["bytes"]:
                raise ValueError(f"{rel}: its bytes end past its shard's")
            for side in ("width", "height"):
                if f[side] is not None:
                    count(f[side])
        for f in self.skipped.values():
            count(f["size"]), count(f["mtime_ns"])
        if self.prepared is not None and count(self.prepared["short_side"]) < 1:
            raise ValueError("prepared.short_side must be at least 1")

    def matching(self, listing: dict[str, tuple[int, int]]) -> set[str]:
        """The files of `listing` (rel -> (size, mtime_ns)) that the pack holds as they are."""
        return {rel for rel, (size, mtime) in listing.items()
                if (f := self.files.get(rel)) is not None and f["size"] == size
                and abs(f["mtime_ns"] - mtime) < MTIME_TOLERANCE_NS}

    def is_current(self, listing: dict[str, tuple[int, int]]) -> bool:
        """The pack was made from exactly these files (those that did not decode included)."""
        if set(self.files) | set(self.skipped) != set(listing):
            return False
        skipped = {rel for rel, f in self.skipped.items()
                   if listing[rel][0] == f["size"]
                   and abs(listing[rel][1] - f["mtime_ns"]) < MTIME_TOLERANCE_NS}
        return len(self.matching(listing)) + len(skipped) == len(listing)

    def serves(self, side: int) -> bool:
        """Whether the pack's images are large enough for a job that stores `side` pixels
        (sizes.stored_side): a verbatim pack serves any; a prepared one up to its short side."""
        return self.prepared is None or self.prepared["short_side"] >= side

    def refusal(self, image_size: int, min_crop_scale: float, folder: str) -> str | None:
        """None when the pack serves a job of `data.image_size` and
        `augmentation.min_crop_scale`; else the line that says why not and what to do (a
        smaller pack is never up-scaled)."""
        need = stored_side(image_size, min_crop_scale)
        if self.serves(need):
            return None
        scale = "" if min_crop_scale == DEFAULT_MIN_CROP_SCALE else \
            f" --min-crop-scale {min_crop_scale:g}"
        return (f"data pack of {folder} was made for short side {self.prepared['short_side']}, "
                f"data.image_size {image_size} (augmentation.min_crop_scale "
                f"{min_crop_scale:g}) needs {need}: rebuild it with `cherry data pack {folder} "
                f"--image-size {image_size}{scale}`")


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

    def load_index(self) -> PackIndex | None:
        """The pack's index, None if there is none; PackError, with the line for a person
        (which file, what is wrong, what to do), if it cannot be read."""
        try:
            raw = self.read(INDEX)
        except OSError as e:
            raise PackError(f"{self.description}/{INDEX} cannot be read "
                            f"({type(e).__name__}: {e}); try again") from None
        if raw is None:
            return None
        try:
            return PackIndex.from_json(raw)
        except PackError as e:
            raise PackError(f"{self.description}/{INDEX}: {e}; rebuild the pack with "
                            f"{self.rebuild_command()}") from None

    def index(self) -> PackIndex | None:
        """The pack's index; None if there is none or it cannot be read (logged)."""
        try:
            return self.load_index()
        except PackError as e:
            log.warning(f"data pack ignored: {e}", pack=self.description)
            return None

    def rebuild_command(self) -> str:
        return "`cherry data pack` on the data folder (or data.pack: on in a job's config)"


class FolderPackPlace(PackPlace):
    def __init__(self, path: Path):
        self.path = Path(path)
        self.description = str(path)

    def rebuild_command(self) -> str:
        folder = self.path.with_name(self.path.name.removesuffix(PACK_SUFFIX))
        return f"`cherry data pack {folder}`"

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
