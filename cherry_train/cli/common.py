"""What every `cherry` command shares: bad input as one line (exit 2), and the queue root,
checked to exist."""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.places import ResolvedRoot, resolve_root
from cherry_train.storage import UnsupportedRoot, open_storage
from cherry_train.storage.gdrive_api import DriveAuthError


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit 2."""


def err(*lines: str) -> None:
    for line in lines:
        print(line, file=sys.stderr)


def root_and_queue(args) -> tuple[ResolvedRoot, JobQueue]:
    resolved = resolve_root(getattr(args, "root", None))
    if resolved.is_fallback:
        err(f"note: no root configured (--root, $CHERRY_ROOT or `cherry init`); using the local "
             f"folder {resolved.root}")
    try:
        return resolved, JobQueue(open_storage(resolved.root))
    except (UnsupportedRoot, DriveAuthError) as e:
        raise UsageError(str(e)) from None


_ROOT_HINT = "with the folder that `cherry submit` uses (it creates the root)"


def require_root(resolved: ResolvedRoot, queue: JobQueue) -> None:
    """A root that does not exist is a mistyped one (or an unmounted Drive): say so, rather
    than show an empty queue or wait on one. The local default root (no root configured) is
    said to be used already, and is empty until the first submit."""
    local = queue.storage.local_path("")
    if local is None:
        if queue.storage.stat("") is None:
            raise UsageError(f"queue root {resolved.root} does not exist (from {resolved.source}),"
                             f" or this account cannot see it ({queue.storage.description}); "
                             f"pass --root {_ROOT_HINT}")
    elif not local.is_dir() and not resolved.is_fallback:
        mount = " (is Google Drive mounted?)" if "/content/drive" in str(local) else ""
        raise UsageError(f"queue root {local} does not exist (from {resolved.source}){mount}; "
                         f"pass --root {_ROOT_HINT}")


def cherry_command(argv0: str | None = None, executable: str | None = None,
                   which=shutil.which) -> str:
    """How to type this `cherry` where the user stands, for commands we print: `cherry` when
    that name on PATH is this very script, else this script's path as it was typed (the quick
    start runs `.venv/bin/cherry` without activating the venv), else the script beside this
    Python, else `python -m cherry_train`."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    executable = executable or sys.executable
    script = Path(argv0) if Path(argv0).name == "cherry" else Path(executable).parent / "cherry"
    on_path = which("cherry")
    if on_path and script.is_file() and Path(on_path).resolve() == script.resolve():
        return "cherry"
    if script.is_file():
        return shlex.quote(str(script))
    return f"{shlex.quote(executable)} -m cherry_train"


def picture_out(out: str | None, stem: str = "cherry-compare") -> tuple[Path, str]:
    """Where a command's picture goes, and how to say so: `--out` as given (an existing file is
    replaced, and the line says so), else `<stem>.png` here, or `<stem>-2.png`, ... the first
    name not taken, so an earlier picture is never overwritten unasked."""
    if out is not None:
        path = Path(out)
        return path, " (replaced the earlier file)" if path.exists() else ""
    path, n = Path(f"{stem}.png"), 1
    while path.exists():
        n += 1
        path = Path(f"{stem}-{n}.png")
    return path, ""
