"""What a running attempt tells the world: heartbeats, metrics.jsonl and curves.png.

The heartbeat runs on its own thread, so a long validation pass or a slow checkpoint upload
never makes a live worker look dead. Every write is fenced: once a later attempt exists, the
reporter stops the trainer and writes nothing more.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import structlog

from cherry_train.jobqueue.protocol import Claim, Fenced, JobQueue
from cherry_train.schemas import Heartbeat, WorkerStatus
from cherry_train.worker.curves import render_curves

log = structlog.get_logger(__name__)


class StopRequest:
    """Set from a signal handler, the heartbeat thread or the trainer; checked at every step."""

    def __init__(self):
        self._event = threading.Event()
        self.reason: str | None = None

    def set(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        return self._event.wait(seconds)


class Reporter:
    def __init__(self, queue: JobQueue, claim: Claim, worker_status: WorkerStatus,
                 stop: StopRequest):
        self.queue, self.claim, self.stop = queue, claim, stop
        self.worker_status = worker_status
        config = claim.manifest.config
        self.interval = config.heartbeat_seconds
        self._progress: dict[str, Any] = {"phase": "starting"}
        self._metrics: list[str] = []
        self._metrics_synced = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self.fenced = False

    # -- metrics ------------------------------------------------------------------------------

    def resume_metrics(self, up_to_step: int) -> None:
        """Keep the lines of earlier attempts up to the checkpoint we resume from, so no step
        is logged twice."""
        raw = self.queue.storage.read_text_or_none(self.claim.paths.metrics) or ""
        kept = []
        for line in raw.splitlines():
            try:
                if json.loads(line).get("step", 0) <= up_to_step:
                    kept.append(line)
            except ValueError:
                continue  # a torn last line from a killed writer
        with self._lock:
            self._metrics = kept
            self._metrics_synced = -1  # rewrite: the stored file may hold dropped lines

    def metric(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._metrics.append(json.dumps(record, separators=(",", ":")))

    def epoch_records(self) -> list[dict]:
        with self._lock:
            lines = list(self._metrics)
        return [r for r in map(json.loads, lines) if r.get("kind") == "epoch"]

    # -- progress and heartbeats ---------------------------------------------------------------

    def update(self, **progress: Any) -> None:
        with self._lock:
            self._progress.update(progress)

    def start(self) -> None:
        self.beat()
        self._thread = threading.Thread(target=self._run, name="cherry-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            try:
                self.beat()
            except Fenced:
                return
            except Exception:  # a failed beat (flaky mount) must not kill the job; retry later
                log.exception("heartbeat failed")

    def close(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def beat(self, **final: Any) -> None:
        """Write the heartbeat and sync metrics: fenced, serialised with the trainer's writes."""
        with self._lock:
            progress = {**self._progress, **final}
            metrics = "\n".join(self._metrics) + "\n" if self._metrics else ""
            unsynced = len(self._metrics) != self._metrics_synced
            count = len(self._metrics)
        claim, now = self.claim, self.queue.clock.now()
        heartbeat = Heartbeat(job_id=claim.job_id, attempt=claim.attempt.n,
                              worker_id=claim.attempt.worker_id, at=now, **progress)
        try:
            self.queue.write_heartbeat(heartbeat)  # raises Fenced before writing
        except Fenced:
            self.fenced = True
            self.stop.set("fenced")
            log.warning("fenced: a later attempt took over; stopping without further writes",
                        job_id=claim.job_id, attempt=claim.attempt.n)
            raise
        if unsynced:
            self.queue.storage.write_atomic(claim.paths.metrics, metrics.encode())
            with self._lock:
                self._metrics_synced = count
        self.queue.write_worker_status(self.worker_status.model_copy(update={"at": now}))

    def fence(self) -> None:
        """Check before a checkpoint or result write."""
        try:
            self.queue.fence(self.claim.job_id, self.claim.attempt.n)
        except Fenced:
            self.fenced = True
            self.stop.set("fenced")
            raise

    def write_curves(self, title: str) -> None:
        epochs = self.epoch_records()
        if epochs:
            started = time.perf_counter()
            self.queue.storage.write_atomic(self.claim.paths.curves, render_curves(epochs, title))
            log.debug("curves written", seconds=round(time.perf_counter() - started, 3))
