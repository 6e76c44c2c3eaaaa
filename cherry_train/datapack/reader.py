"""A pack read where it lies: its shard files fetched whole into a local folder (every sample
and the shard checked in the same pass), then each sample read at its offset, no file per
image written anywhere."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cherry_train.datapack.index import INDEX, UNPACK_THREADS, PackError, PackIndex, PackPlace
from cherry_train.safepaths import UnsafePath, plain_name

CHUNK = 4 << 20


@dataclass
class Fetched:
    fetched: list[str]  # shards copied now
    kept: list[str]  # shards already in the folder
    bytes: int  # bytes copied now
    seconds: float


def fetch_shards(index: PackIndex, place: PackPlace, target_dir: Path, scratch: Path,
                 progress: Callable[[int], None] | None = None,
                 shards: Iterable[str] | None = None,
                 check: Callable[[str, dict, bytes], None] | None = None) -> Fetched:
    """Copy the pack's shard files (or only `shards`) from `place` into `target_dir`, whole
    files (one request each on Drive), a few at a time. Each is written under a temp name,
    its every sample checked against its sha256 in the index and its length against the
    shard's as the bytes pass, and only then renamed: a shard under its own name here was
    checked. The shard's own sha256 is not computed again: every byte ever read from a local
    shard is a sample's (PackedFiles reads at the index's offsets, never the tar headers
    between them), and hashing each byte once halves the CPU a 2-core VM spends here. Such a
    shard of the right length is kept, not checked again (a restarted worker would read
    gigabytes before its first step).
    A shard that fails raises PackError naming it and what to do; temp leftovers and shards
    the index no longer names are removed (target_dir holds one pack). `progress(n)`: n more
    samples ready. `check(rel, entry, data)` looks at each sample as it passes (raising
    PackError refuses its shard): a shard under its own name passed it too."""
    started = time.perf_counter()
    names = sorted(index.shards if shards is None else set(shards))
    for name in names:  # the name becomes a path here
        try:
            plain_name(name, f"{place.description}/{INDEX}")
        except UnsafePath as e:
            raise PackError(str(e)) from None
        if name not in index.shards:
            raise PackError(f"{place.description}/{INDEX} names no shard {name}")
    target_dir = Path(target_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    if shards is None:
        for leftover in os.listdir(target_dir):
            if leftover.endswith(".part") or (leftover.startswith("shard-") and
                                              leftover not in index.shards):
                (target_dir / leftover).unlink(missing_ok=True)
    members: dict[str, list[tuple[str, dict]]] = {name: [] for name in names}
    for rel, f in index.files.items():
        if f["shard"] in members:
            members[f["shard"]].append((rel, f))
    todo, kept = [], []
    for name in names:
        if _length(target_dir / name) == index.shards[name]["bytes"]:
            kept.append(name)
            if progress is not None:
                progress(len(members[name]))
        else:
            todo.append(name)
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(UNPACK_THREADS) as pool:
        list(pool.map(lambda name: _fetch(index, place, name, members[name], target_dir,
                                          scratch, progress, check or _no_check), todo))
    return Fetched(fetched=todo, kept=kept, bytes=sum(index.shards[n]["bytes"] for n in todo),
                   seconds=round(time.perf_counter() - started, 3))


def _no_check(rel: str, entry: dict, data: bytes) -> None:
    pass


def _length(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _fetch(index: PackIndex, place: PackPlace, name: str, members: list[tuple[str, dict]],
           target_dir: Path, scratch: Path, progress, check) -> None:
    entry = index.shards[name]
    where = f"shard {name} of {place.description}"
    fix = f"rebuild the pack with {place.rebuild_command()}"
    part = target_dir / f".{name}.part"
    at = 0
    try:
        with place.open(name, scratch) as src, open(part, "wb") as out:
            def copy(n: int, sample=None) -> bytes:
                nonlocal at
                kept = []  # a sample's bytes (tens of kB), for `check`
                while n > 0:
                    chunk = src.read(min(n, CHUNK))
                    if not chunk:
                        raise PackError(f"{where} ends at byte {at}, its index says "
                                        f"{entry['bytes']}: it is cut short; {fix}")
                    if sample is not None:
                        sample.update(chunk)
                        kept.append(chunk)
                    out.write(chunk)
                    n -= len(chunk)
                    at += len(chunk)
                return b"".join(kept)

            for rel, f in sorted(members, key=lambda m: m[1]["offset"]):
                if f["offset"] < at:
                    raise PackError(f"{where}: its index has overlapping samples; {fix}")
                copy(f["offset"] - at)
                sample = hashlib.sha256()
                data = copy(f["length"], sample)
                if sample.hexdigest() != f["sha256"]:
                    raise PackError(f"{where}: {rel} does not match its sha256 in the index "
                                    f"(the shard is damaged); {fix}")
                check(rel, f, data)
                if progress is not None:
                    progress(1)
            copy(entry["bytes"] - at)
            if src.read(1):
                raise PackError(f"{where} is longer than its index says; {fix}")
            # No fsync: a crash of the machine loses this disk (a Colab VM) or leaves a shard
            # whose length is checked on the next fetch; syncing gigabytes would cost seconds.
        os.replace(part, target_dir / name)
    except OSError as e:
        raise PackError(f"{where} cannot be read: {type(e).__name__}: {e}; try again, or "
                        f"{fix}") from e
    finally:
        part.unlink(missing_ok=True)


class PackedFiles:
    """The samples of a pack whose shards `fetch_shards` put in `folder`, read in place at their
    offsets (os.pread: no shared file position, so threads and processes read at once). Not
    hashed here: fetch_shards checked every sample once. Picklable and fork-safe (loader
    processes use it): descriptors are opened lazily, per process, and never pickled."""

    def __init__(self, index: PackIndex, folder: Path):
        for name in index.shards:
            try:
                plain_name(name, f"pack index of {index.source}")
            except UnsafePath as e:
                raise PackError(str(e)) from None
        self.index, self.folder = index, Path(folder)
        self._fds: dict[str, int] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}, "_pid": None}

    def __len__(self) -> int:
        return len(self.index.files)

    def __contains__(self, rel: str) -> bool:
        return rel in self.index.files

    def names(self) -> list[str]:
        return sorted(self.index.files)

    def size(self, rel: str) -> int:
        """The stored bytes' length (KeyError for a file the pack does not hold)."""
        return self.index.files[rel]["length"]

    def dims(self, rel: str) -> tuple[int | None, int | None]:
        """The stored image's (width, height), from the index: no header to parse."""
        f = self.index.files[rel]
        return f["width"], f["height"]

    def read(self, rel: str) -> bytes:
        f = self.index.files[rel]
        data = os.pread(self._fd(f["shard"]), f["length"], f["offset"])
        if len(data) != f["length"]:
            raise PackError(f"shard {f['shard']} in {self.folder} ends inside {rel}: fetch "
                            "the pack's shards again (fetch_shards)")
        return data

    def _fd(self, shard: str) -> int:
        if self._pid != os.getpid():  # a forked child: the parent's descriptors are not ours
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            try:
                fd = os.open(self.folder / shard, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except FileNotFoundError:
                raise PackError(f"shard {shard} is not in {self.folder}: fetch the pack's "
                                "shards first (fetch_shards)") from None
            if os.fstat(fd).st_size != self.index.shards[shard]["bytes"]:
                # The index's lengths are only trusted up to the shard's real length: no
                # read of a length an index made up (a huge allocation), no short read.
                os.close(fd)
                raise PackError(f"shard {shard} in {self.folder} is not the length its index "
                                "says: fetch the pack's shards again (fetch_shards)")
            kept = self._fds.setdefault(shard, fd)  # atomic: two threads open it once
            if kept != fd:
                os.close(fd)
                fd = kept
        return fd

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __enter__(self) -> PackedFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
