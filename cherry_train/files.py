"""Files on this machine's disk, written so that a reader (or a crash) never sees half of one:
write a temp name beside the target, then rename it over the target in one step."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: In every temp name: `.<name><TMP_MARK><pid>-<random>`. Listings skip such names.
TMP_MARK = ".tmp-"


def temp_beside(target: Path) -> Path:
    """A hidden temp name, unique per writer, in the target's own folder (so the rename stays
    on one file system)."""
    return target.with_name(f".{target.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_temp(name: str) -> bool:
    return name.startswith(".") and TMP_MARK in name


@contextmanager
def replacing(target: Path) -> Iterator[Path]:
    """A temp path to write `target` at: when the block ends without an error it replaces
    `target` in one rename; otherwise it is removed, and `target` is as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(target)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_synced(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` and wait until the disk (or the mount) has it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, mode)  # in case the file existed with other permissions


def write_atomic(target: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `target` with `data`, all or nothing, synced; `mode` from the start (a token is
    never briefly readable by others)."""
    with replacing(target) as tmp:
        write_synced(tmp, data, mode)
