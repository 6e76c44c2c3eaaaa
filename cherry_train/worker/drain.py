"""Whether this worker was asked to drain (`cherry drain WORKER_ID`): finish the job in hand,
take no new one, exit 0. Seen in the idle poll's listing of queue/ (no request of its own) or,
while a job trains, by the heartbeat thread (one look per beat)."""

from __future__ import annotations

import threading

import structlog

from cherry_train import logs
from cherry_train.jobqueue.jobfiles import JobFiles
from cherry_train.jobqueue.polling import Poll
from cherry_train.jobqueue.workercontrol import clear_drain, drain_requested

log = structlog.get_logger(__name__)

#: Why a drained worker's loop ended (its exit log line, and run()'s test of it).
DRAINED = "drained"


class Drain:
    def __init__(self, files: JobFiles, poll: Poll, worker_id: str):
        self.files, self.poll, self.worker_id = files, poll, worker_id
        self._seen = threading.Event()  # set by the loop or by the heartbeat thread

    @property
    def seen(self) -> bool:
        return self._seen.is_set()

    def in_listing(self) -> bool:
        """After a poll of queue/: whether its listing (or an earlier look) held our request."""
        if not self.seen and self.worker_id in self.poll.drains:
            self._note("the queue's listing")
        return self.seen

    def check(self) -> bool:
        """At a heartbeat: one look for our request."""
        if not self.seen and drain_requested(self.files, self.worker_id):
            self._note("a heartbeat")
        return self.seen

    def done(self) -> None:
        """Remove the request as the worker exits: a later start under this id works on."""
        try:
            clear_drain(self.files, self.worker_id)
        except Exception as e:  # the worker exits anyway; the next start would drain at once
            log.warning("could not remove the drain request; remove it before starting this "
                        "worker id again", worker_id=self.worker_id, error=logs.brief(e))

    def _note(self, where: str) -> None:
        self._seen.set()
        log.info("drain requested: no new job; the worker exits once its job (if any) is done",
                 worker_id=self.worker_id, seen_in=where)
