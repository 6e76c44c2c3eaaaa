"""One live process per worker id: a second notebook tab with the same id stops at its start,
while a worker restarted after its predecessor died goes on."""

from __future__ import annotations

import structlog

from cherry_train.jobqueue.claims import WorkerIdentity, gone_from_here, still_running_here
from cherry_train.jobqueue.clock import age_seconds
from cherry_train.jobqueue.lifecycle import JobQueue, WorkerIdInUse
from cherry_train.schemas import WorkerState

log = structlog.get_logger(__name__)


def refuse_if_id_in_use(queue: JobQueue, me: WorkerIdentity) -> None:
    """Two live processes must not share a worker id (two Colab tabs): the second stops.

    On this host the status's pid tells at once: alive (and the process that wrote it), the
    second stops; gone, it goes on. Elsewhere a status file alone cannot tell a live worker from
    one killed a second ago (a Colab disconnect), so watch it: a live worker rewrites it within
    its interval."""
    other = queue.worker_status(me.worker_id)
    if other is None or other.incarnation == me.incarnation or \
            other.state == WorkerState.stopped or gone_from_here(other.host, other.pid, me):
        return
    if still_running_here(other.host, other.pid, other.at, me):
        raise WorkerIdInUse(
            f"worker id {me.worker_id!r} is in use by a live worker on this host (pid "
            f"{other.pid}, {other.state}). Is a second notebook or terminal running it? Stop "
            "it, or start this one with another --worker-id.")
    window = 2 * other.interval_seconds
    if age_seconds(queue.clock, other.at) > window:
        return
    log.info("a worker with this id was seen recently; checking whether it is alive",
             worker_id=me.worker_id, seconds=round(window, 1))
    while age_seconds(queue.clock, other.at) <= window:
        queue.clock.sleep(min(0.5, window / 4))
        latest = queue.worker_status(me.worker_id)
        if latest is not None and (latest.at, latest.incarnation) != (other.at,
                                                                      other.incarnation):
            raise WorkerIdInUse(
                f"worker id {me.worker_id!r} is in use by a live worker (host "
                f"{latest.host or '?'}, pid {latest.pid}, {latest.state}). Is a second "
                "notebook or tab running? Stop it, or start this one with another "
                "--worker-id.")
