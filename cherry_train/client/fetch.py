"""`cherry fetch`: a job's results onto this machine — verified, and resumable after a cut.

Every file the worker listed in result.json comes with its size and sha256; checkpoints have
their .sha256 beside them. A download goes into `<file>.partial` in chunks and continues from
where it stopped; a file already here with the right checksum is not downloaded again.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cherry_train.checksums import file_sha256
from cherry_train.jobqueue import layout
from cherry_train.jobqueue.layout import JobPaths
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.safepaths import inside
from cherry_train.schemas import Result

CHUNK = 8 << 20
#: Files larger than this get a progress bar.
BAR_ABOVE = 1 << 20


class ChecksumMismatch(Exception):
    pass


@dataclass
class Fetched:
    path: Path
    bytes: int
    status: str  # downloaded | resumed | up to date | unverified



def wanted_files(queue: JobQueue, job_id: str, checkpoints: bool) -> list[tuple[str, int | None,
                                                                               str | None]]:
    """(path in the root, size, sha256) of what to fetch; size/sha None when unknown."""
    paths = JobPaths(job_id)
    raw = queue.storage.read_text_or_none(paths.result)
    files: list[tuple[str, int | None, str | None]] = []
    if raw is not None:
        result = Result.from_json(raw)
        # The record itself, checked against the copy just read (it never changes once written).
        data = raw.encode()
        files.append((paths.result, len(data), hashlib.sha256(data).hexdigest()))
        files += [(f"{paths.dir}/{a.path}", a.bytes, a.sha256) for a in result.artifacts.values()]
    else:  # still running: what exists now, unverified
        files += [(p, None, None) for p in paths.artifact_paths().values()
                  if queue.storage.exists(p)]
    if checkpoints:
        names = queue.storage.list_dir(paths.checkpoints_dir)
        for name in names:
            step = layout.checkpoint_step(name)
            if step is None or f"{name}.sha256" not in names:
                continue
            digest = queue.storage.read_bytes(paths.checkpoint_checksum(step)).decode().strip()
            files.append((paths.checkpoint(step), None, digest))
    return files


def fetch_file(queue: JobQueue, path: str, target: Path, size: int | None, sha256: str | None,
               progress: bool) -> Fetched:
    if sha256 is not None and target.is_file() and file_sha256(target) == sha256:
        return Fetched(target, target.stat().st_size, "up to date")
    if size is None:
        info = queue.storage.stat(path)
        size = info.size if info else 0
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    offset = partial.stat().st_size if partial.is_file() else 0
    if offset > size:  # not a prefix of this file: start over
        partial.unlink()
        offset = 0
    status = "resumed" if offset else "downloaded"
    bar = _bar(progress and size > BAR_ABOVE, size, offset, target.name)
    with open(partial, "ab") as f:
        while offset < size:
            chunk = queue.storage.read_range(path, offset, min(CHUNK, size - offset))
            if not chunk:
                break
            f.write(chunk)
            offset += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    if sha256 is not None and file_sha256(partial) != sha256:
        partial.unlink()  # a corrupt copy must not be resumed from
        raise ChecksumMismatch(f"{path}: the download does not match its sha256; run the same "
                               "command again to download it afresh")
    os.replace(partial, target)
    return Fetched(target, offset, status if sha256 is not None else "unverified")


def fetch(queue: JobQueue, job_id: str, dest: Path, checkpoints: bool = False,
          progress: bool = True) -> list[Fetched]:
    """Every file into `dest`. The paths come from result.json, which whoever can write the
    queue folder could have written: all of them are checked to stay inside `dest` before
    anything is written, and one that would not refuses the whole fetch (UnsafePath)."""
    paths = JobPaths(job_id)
    wanted = [(path, inside(dest, path.removeprefix(paths.dir + "/"), paths.result), size, digest)
              for path, size, digest in wanted_files(queue, job_id, checkpoints)]
    return [fetch_file(queue, path, target, size, digest, progress)
            for path, target, size, digest in wanted]


def _bar(enabled: bool, total: int, initial: int, name: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                desc=name, leave=False)
