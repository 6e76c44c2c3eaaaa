"""Steering a worker from anywhere: a drain request (finish the job in hand, take no new one,
exit) is the file queue/<worker_id>.drain (layout.drain_request_path). The client only ever
creates it; the worker it names notices it in its idle poll's listing or at a heartbeat, and
removes it as it exits, so a later start under the same id is not drained at once."""

from __future__ import annotations

import json
import uuid

from cherry_train.jobqueue import layout
from cherry_train.jobqueue.ids import WORKER_ID_RE
from cherry_train.jobqueue.jobfiles import JobFiles


class UnknownWorker(Exception):
    """A drain for a worker id that never wrote a status to this root: one line for the user."""


def request_drain(files: JobFiles, worker_id: str, requested_by: str = "") -> bool:
    """Ask a worker to drain; False if it was asked before. UnknownWorker, listing the known
    ids, if no worker of that id ever wrote its status here (a typo would drain nobody)."""
    known = sorted(w.worker_id for w in files.workers())
    if not WORKER_ID_RE.fullmatch(worker_id) or worker_id not in known:
        listed = ", ".join(known) if known else "none has written a status to this root yet"
        raise UnknownWorker(f"WORKER_ID: no worker {worker_id!r} on this root (known: {listed});"
                            " `cherry status` lists them")
    record = json.dumps({"worker_id": worker_id, "requested_by": requested_by,
                         "at": files.clock.now().isoformat(),
                         "request": uuid.uuid4().hex}).encode()  # unique, as creates need
    return files.storage.create_exclusive(layout.drain_request_path(worker_id), record)


def drain_requested(files: JobFiles, worker_id: str) -> bool:
    """One look (a stat): what a busy worker's heartbeat asks."""
    return files.storage.exists(layout.drain_request_path(worker_id))


def drains_in(names) -> set[str]:
    """The worker ids that a listing of queue/ holds drain requests for."""
    suffix = layout.DRAIN_SUFFIX  # a name that is no worker id (from anyone) drains nobody
    return {n[: -len(suffix)] for n in names
            if n.endswith(suffix) and WORKER_ID_RE.fullmatch(n[: -len(suffix)])}


def drain_requests(files: JobFiles) -> set[str]:
    """Every pending drain request (`cherry status`): one listing of queue/."""
    return drains_in(files.storage.list_dir(layout.QUEUE))


def clear_drain(files: JobFiles, worker_id: str) -> None:
    """The drained worker's last act: the request is done."""
    files.storage.delete(layout.drain_request_path(worker_id))
