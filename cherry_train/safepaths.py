"""Paths that stay inside their folder: a relative path read from the queue folder (a result's
artifacts, a Drive listing, a pack's index) joined to a folder on this machine, and a data folder
walked without following symbolic links out of it.

Everything in the queue folder is written by whoever can write that (shared) folder, so a path
from it is checked before anything is written at it, as pip refuses wheel members whose paths
leave the target and tarfile's "data" filter refuses links.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePath

REFUSED = "absolute paths, '..', '.', empty parts, '\\' and NUL are refused"


class UnsafePath(ValueError):
    """A path from the queue folder (or a listing) that would not stay inside its folder."""


def _plain(part: str) -> bool:
    # PurePath(part).name == part: no drive or anchor on this platform ("C:" on Windows). On
    # POSIX, with '/' split off and the rest refused here, it is always so: skipped there, as
    # a listing checks 60,000 names.
    return part not in ("", ".", "..") and "\\" not in part and "\0" not in part and \
        (os.sep == "/" or PurePath(part).name == part)


def check_inside(folder: Path, rel: str, origin: str) -> list[str]:
    """The parts of a '/'-separated relative path that `origin` (a record, a listing)
    supplied; UnsafePath, naming it, unless every part is a plain name."""
    parts = rel.split("/")
    if not all(_plain(part) for part in parts):
        raise UnsafePath(f"{origin}: the path {rel!r} would not stay inside {folder} ({REFUSED})")
    return parts


def inside(folder: Path, rel: str, origin: str) -> Path:
    """`folder / rel`, checked as check_inside does."""
    return folder.joinpath(*check_inside(folder, rel, origin))


def plain_name(name: str, origin: str) -> str:
    """One name of a listing (Drive allows '/' and '..' in a name): a single plain name, or
    UnsafePath naming it."""
    if "/" in name or not _plain(name):
        raise UnsafePath(f"{origin}: the name {name!r} is not a plain file name ('/', '..', "
                         "'.', empty names, '\\' and NUL are refused)")
    return name


@dataclass
class Walk:
    files: list[str] = field(default_factory=list)  # '/'-separated, relative, sorted
    links: list[str] = field(default_factory=list)  # links met: not followed, not listed

    def skipped(self) -> str | None:
        """The one line that says links were skipped (None if there were none)."""
        if not self.links:
            return None
        return (f"{len(self.links)} symbolic link{'s' * (len(self.links) > 1)} skipped "
                f"(first: {self.links[0]}): data is never read through a link")


def walk_files(folder: Path, scan: Callable[[Path], Iterable[os.DirEntry]] | None = None) -> Walk:
    """Every regular file below `folder`, hidden names ('.') left out. A symbolic link, to a
    file or a folder, inside the folder or out of it, is not followed: it would let whoever
    writes the folder have any file this machine can read copied into a cache and packed
    beside the data. `scan` lists one folder (retried on a flaky mount, say)."""
    scan = scan or (lambda p: list(os.scandir(p)))
    walk = Walk()
    pending = [""]
    while pending:
        rel = pending.pop()
        for entry in scan(folder / rel if rel else folder):
            if entry.name.startswith("."):
                continue
            child = f"{rel}/{entry.name}" if rel else entry.name
            if entry.is_symlink():
                walk.links.append(child)
            elif entry.is_dir(follow_symlinks=False):
                pending.append(child)
            elif entry.is_file(follow_symlinks=False):
                walk.files.append(child)
            # sockets, pipes, devices: not data
    walk.files.sort()
    walk.links.sort()
    return walk
