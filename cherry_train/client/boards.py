"""Where TensorBoard reads a root's jobs: the root's own `done/` on a mount or a local folder
(each job's `tensorboard/` folder is a run), or, for a Drive API root, a local copy of those
folders, brought up to date file by file (a file whose size changed comes again)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import platformdirs
import structlog

from cherry_train.jobqueue import layout
from cherry_train.jobqueue.layout import JobPaths
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.jobqueue.views import all_job_ids
from cherry_train.safepaths import UnsafePath, inside, plain_name

log = structlog.get_logger(__name__)


def default_copy_dir(queue: JobQueue) -> Path:
    key = hashlib.sha256(queue.storage.description.encode()).hexdigest()[:12]
    return platformdirs.user_cache_path("cherry-train") / "tensorboard" / key


def logdir(queue: JobQueue) -> Path:
    """The folder to give TensorBoard's --logdir (synced first, for an API root)."""
    local = queue.storage.local_path("")
    if local is not None:
        return local / layout.DONE
    return synced_logdir(queue, default_copy_dir(queue))


def synced_logdir(queue: JobQueue, target: Path) -> Path:
    """Copy every job's event files that are new or changed into target/<job>/tensorboard/.
    The names come from Drive listings (anyone who can write the folder chose them): a name
    that is not a plain file name is skipped, said in one line, and nothing is written for it."""
    storage = queue.storage
    for job_id in all_job_ids(queue):  # ids of the id pattern only
        remote = JobPaths(job_id).tensorboard
        for name, info in storage.list_entries(remote).items():
            try:
                local = inside(target, f"{job_id}/tensorboard/{plain_name(name, remote)}",
                               storage.description)
            except UnsafePath as e:
                log.warning(f"skipped: {e}")
                continue
            if info.is_dir or (local.exists() and local.stat().st_size == info.size):
                continue
            storage.download(f"{remote}/{name}", local)
    target.mkdir(parents=True, exist_ok=True)
    return target
