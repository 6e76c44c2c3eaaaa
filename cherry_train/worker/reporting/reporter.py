"""What a running attempt tells the world: heartbeats, metrics.jsonl and curves.png.

The heartbeat runs on its own thread, so a long validation pass or a slow checkpoint upload
never makes a live worker look dead. Every write is fenced: once a later attempt exists, the
reporter stops the trainer and writes nothing more.
"""

from __future__ import annotations

import contextvars
import json
import threading
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import structlog

from cherry_train import logs
from cherry_train.backoff import Stopped
from cherry_train.jobqueue.owner import Fenced, Owner
from cherry_train.plots import render_curves
from cherry_train.schemas import Heartbeat, Phase, WorkerState, WorkerStatus
from cherry_train.worker.drain import Drain
from cherry_train.worker.reporting.tensorboard import Board
from cherry_train.worker.signals import StopRequest

log = structlog.get_logger(__name__)


class Reporter:
    def __init__(self, owner: Owner, worker_status: WorkerStatus, stop: StopRequest,
                 interval: float, deadline: datetime | None = None, board: Board | None = None,
                 drain: Drain | None = None):
        self.owner, self.stop = owner, stop
        self.drain = drain  # a drain request, looked for at each beat (the job still finishes)
        self.board = board  # TensorBoard: every metrics line also goes there
        self.interval = interval  # the job's heartbeat_seconds
        self.deadline = deadline  # the runtime cap, less the time to checkpoint and release
        self.claim = owner.claim
        self.worker_status = worker_status
        self._progress: dict[str, Any] = {"phase": Phase.starting}
        self._metrics: list[str] = []
        self._metrics_synced = 0
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()  # held while metrics.jsonl is written
        self._log_lines = logs.open_tap(self.claim.job_id)  # this job's events, as JSON lines
        self._log_synced = 0
        self._log_before = ""  # worker.log of earlier attempts, kept as history
        self._thread: threading.Thread | None = None
        self._done = threading.Event()

    # -- metrics ------------------------------------------------------------------------------

    def resume_metrics(self, up_to_step: int) -> None:
        """Keep the lines of earlier attempts up to the checkpoint we resume from, so no step
        is logged twice."""
        raw = self.owner.reader.read_text_or_none(self.claim.paths.metrics) or ""
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
        if self.board is not None and up_to_step:
            self.board.purge_step = up_to_step + 1  # what earlier attempts logged past it goes
            self.board.seed_best(self.epoch_records())

    def metric(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._metrics.append(json.dumps(record, separators=(",", ":")))
        if self.board is not None:
            self.board.add(record)

    def epoch_records(self) -> list[dict]:
        with self._lock:
            lines = list(self._metrics)
        return [r for r in map(json.loads, lines) if r.get("kind") == "epoch"]

    # -- progress and heartbeats ---------------------------------------------------------------

    def update(self, **progress: Any) -> None:
        with self._lock:
            self._progress.update(progress)

    def start(self) -> None:
        self._log_before = self.owner.reader.read_text_or_none(self.claim.paths.log) or ""
        self.beat()
        context = contextvars.copy_context()  # the job's log fields (job_id, attempt)
        self._thread = threading.Thread(target=context.run, args=(self._run,),
                                        name="cherry-heartbeat", daemon=True)
        self._thread.start()

    def update_now(self, **progress: Any) -> None:
        """update(), in status at once, not one heartbeat interval later (a copy that takes
        minutes, where an attempt starts)."""
        self.update(**progress)
        self.beat_now()

    def beat_now(self) -> None:
        """Write the heartbeat now, from the calling thread; if that fails, the heartbeat
        thread tries at its next beat (a failed beat never ends training)."""
        try:
            self.beat()
        except Fenced:
            raise
        except Exception as e:
            log.warning("heartbeat failed; the next beat tries again", error=logs.brief(e))

    def _run(self) -> None:
        failing = 0  # beats failed in a row: one traceback per outage, not one per beat
        while not self._done.wait(self.interval):
            try:
                self.beat()
            except (Fenced, Stopped):  # the worker stops: its way out writes the last beat
                return
            except Exception as e:  # a failed beat (flaky mount) must not kill the job
                failing += 1
                if failing == 1:
                    log.exception("heartbeat failed; trying again at every beat",
                                  job_id=self.claim.job_id)
                else:
                    log.warning("heartbeat still failing", job_id=self.claim.job_id,
                                failed_beats=failing, error=logs.brief(e))
                continue
            if failing:
                log.info("heartbeat written again", job_id=self.claim.job_id,
                         failed_beats=failing)
                failing = 0

    def close(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.board is not None:  # the attempt's last lines are logged: store them once more
            try:
                with self._on_fenced():
                    self.board.store()
            except Fenced:
                pass
            except Exception as e:  # a picture of the run; never worth the job
                log.warning("could not store the TensorBoard events", error=logs.brief(e))
            self.board.close()

    def finish(self) -> None:
        """The last sync of this attempt's log; stop collecting it."""
        self.sync_log()
        logs.close_tap(self.claim.job_id)

    def heartbeat(self, **final: Any) -> Heartbeat:
        """The heartbeat record as things stand, with `final` fields on top (a release's)."""
        with self._lock:
            progress = {**self._progress, **final}
        claim = self.claim
        return Heartbeat(job_id=claim.job_id, attempt=claim.attempt.n,
                         worker_id=claim.attempt.worker_id, at=self.owner.clock.now(), **progress)

    def beat(self, **final: Any) -> None:
        """Write the heartbeat and sync metrics (fenced); notice a cancel or drain request."""
        claim, heartbeat = self.claim, self.heartbeat(**final)
        now = heartbeat.at
        with self._on_fenced():
            self.owner.write(claim.paths.heartbeat, heartbeat.to_json())
        self.sync_metrics()
        self.sync_log()
        training = not self._done.is_set()  # the final beats after close() look no further
        if training and self.drain is not None and \
                self.worker_status.state != WorkerState.draining and self.drain.check():
            self.worker_status = self.worker_status.model_copy(
                update={"state": WorkerState.draining})  # `cherry status` shows it from now
        self.owner.write_worker_status(self.worker_status.model_copy(update={"at": now}))
        if training and self.deadline is not None and now >= self.deadline:
            if not self.stop.is_set():
                log.info("runtime cap near: checkpointing and handing the job back",
                         job_id=claim.job_id)
            self.stop.set("max-runtime")
        if training and not self.stop.is_set() and self.owner.cancel_requested():
            log.info("cancel requested: checkpointing, then stopping", job_id=claim.job_id)
            self.stop.set("cancel")

    def sync_metrics(self) -> None:
        """Write metrics.jsonl if lines were added. Called at each heartbeat, and before each
        checkpoint is written: a resume keeps the lines up to its checkpoint, so they must be
        stored first. One writer at a time (heartbeat and checkpoint threads), so an older
        snapshot of the lines can never land after a newer one."""
        with self._sync_lock:
            with self._lock:
                if len(self._metrics) == self._metrics_synced:
                    return
                count = len(self._metrics)
                data = ("\n".join(self._metrics) + "\n").encode() if self._metrics else b""
            with self._on_fenced():
                self.owner.write(self.claim.paths.metrics, data)
                if self.board is not None:
                    self.board.store()
            with self._lock:
                self._metrics_synced = count

    def sync_log(self) -> None:
        """Rewrite worker.log if this attempt logged more (JSON lines, like the worker's)."""
        count = len(self._log_lines)
        if count == self._log_synced:
            return
        text = self._log_before + "".join(line + "\n" for line in self._log_lines[:count])
        with self._on_fenced():
            self.owner.write(self.claim.paths.log, text.encode())
        self._log_synced = count

    def write_curves(self, title: str) -> None:
        """curves.png, best effort: a picture that cannot be stored (Drive full, say) is logged,
        never worth the job; the next epoch draws it again."""
        epochs = self.epoch_records()
        if not epochs:
            return
        try:
            with self._on_fenced():
                self.owner.write(self.claim.paths.curves, render_curves(epochs, title))
        except Fenced:
            raise
        except Exception as e:
            log.warning("could not store curves.png; training goes on", error=logs.brief(e))

    @contextmanager
    def _on_fenced(self):
        try:
            yield
        except Fenced:
            self.stop.set("fenced")
            log.warning("fenced: a later attempt took over; stopping without further writes",
                        job_id=self.claim.job_id, attempt=self.claim.attempt.n)
            raise
