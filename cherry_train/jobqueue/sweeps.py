"""Sweeps on the queue, without a server: a sweep record written once by the client, and trials
that are ordinary jobs. Trial n exists once `sweeps/<id>/trials/<n>.json` is created, exclusively
(two workers never make the same trial), naming the job it becomes; its manifest follows, and is
written again by whoever finds it missing (a creator killed in between).

Whoever ends or pauses a trial, or finds a sweep with fewer than `parallel` trials in flight,
tops it up: `top_up` creates trials until `parallel` are queued or running (a trial paused at an
ASHA rung does not count), or the sweep has all its trials.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import structlog
from pydantic import ValidationError

from cherry_train import sweepspace
from cherry_train.jobqueue.clock import age_seconds
from cherry_train.jobqueue.ids import new_job_id
from cherry_train.jobqueue.layout import SWEEPS, JobPaths, SweepPaths
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.jobqueue.views import JobView, job_view
from cherry_train.schemas import (
    AttemptEnd,
    Heartbeat,
    JobState,
    Manifest,
    Phase,
    SweepRecord,
    TrainingConfig,
    TrialRecord,
)
from cherry_train.schemas.sweep import SweepRef

log = structlog.get_logger(__name__)

#: A trial record whose job is still not queued after this long lost its creator (killed between
#: the two writes): whoever sees it queues the job. A live creator writes it within moments.
ORPHAN_SECONDS = 60.0


def epoch_records(queue: JobQueue, job_id: str) -> dict[int, dict]:
    """A job's epoch records (1-based epoch -> its metrics.jsonl line)."""
    raw = queue.storage.read_text_or_none(JobPaths(job_id).metrics) or ""
    found = {}
    for line in raw.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn last line from a killed writer
        if isinstance(record, dict) and record.get("kind") == "epoch" and \
                isinstance(record.get("epoch"), int):
            found[record["epoch"]] = record
    return found


def epoch_values(queue: JobQueue, job_id: str, metric: str) -> dict[int, float]:
    """A job's `metric` at each finished epoch (1-based), from its metrics.jsonl."""
    return {epoch: float(r[metric]) for epoch, r in epoch_records(queue, job_id).items()
            if isinstance(r.get(metric), int | float)}


def paused(end: Heartbeat | AttemptEnd | None) -> bool:
    """Whether a job's last attempt paused its trial at an ASHA rung: its last heartbeat says
    so (or what the next attempt recorded of that heartbeat)."""
    return end is not None and end.released and end.phase == Phase.paused


@dataclass
class Trial:
    record: TrialRecord
    view: JobView | None = None  # None: its manifest is not written yet
    values: dict[int, float] = field(default_factory=dict)  # the metric by epoch

    @property
    def state(self) -> JobState | None:
        return self.view.state if self.view is not None else None

    @property
    def in_flight(self) -> bool:
        return self.state in (None, JobState.queued, JobState.running)

    @property
    def paused(self) -> bool:
        """Paused at an ASHA rung: released by its worker until promoted (or pruned)."""
        return self.state == JobState.running and paused(self.view.heartbeat)

    @property
    def word(self) -> str:
        """Its state as `cherry status` counts it ("paused" is running to the queue)."""
        return "paused" if self.paused else (self.state or JobState.queued).value

    def best(self, maximize: bool) -> float | None:
        if not self.values:
            return None
        return max(self.values.values()) if maximize else min(self.values.values())


class Sweeps:
    def __init__(self, queue: JobQueue):
        self.queue = queue
        self._records: dict[str, SweepRecord] = {}  # written once: read once
        self._done: set[str] = set()  # sweeps with every trial made and ended

    # -- the client's side ------------------------------------------------------------------

    def submit(self, config: TrainingConfig, *, config_file: str = "", submitted_by: str = "",
               client_version: str = "") -> tuple[SweepRecord, list[Manifest]]:
        """Check every trial the sweep can make, write the sweep record, and queue its first
        `parallel` trials."""
        sweepspace.check_space(config)
        total = sweepspace.total_trials(config.sweep)
        now = self.queue.clock.now()
        record = SweepRecord(sweep_id="sweep-" + new_job_id(config.name or "sweep", now),
                             name=config.name or "sweep", submitted_at=now,
                             submitted_by=submitted_by, config_file=config_file,
                             client_version=client_version, config=config, trials=total)
        self.queue.storage.write_atomic(SweepPaths(record.sweep_id).record, record.to_json())
        self._records[record.sweep_id] = record
        return record, self.top_up(record.sweep_id, by=submitted_by)

    def cancel(self, sweep_id: str, requested_by: str = "") -> list[str]:
        """No more trials; every trial not finished is asked to stop. The trials asked."""
        paths = SweepPaths(sweep_id)
        self.queue.storage.create_exclusive(paths.cancel_request, requested_by.encode() or b"-")
        asked = []
        for trial in self.trials(sweep_id):
            if trial.in_flight and trial.view is not None:
                self.queue.request_cancel(trial.record.job_id, requested_by)
                asked.append(trial.record.job_id)
        return asked

    # -- reading --------------------------------------------------------------------------------

    def sweep_ids(self) -> list[str]:
        return sorted(self.queue.storage.list_dir(SWEEPS), reverse=True)  # newest first

    def record(self, sweep_id: str) -> SweepRecord | None:
        """The sweep's record; None when missing or unreadable (anyone who can write the
        folder can write it: one warning, and the other sweeps are served as before)."""
        if sweep_id not in self._records:
            raw = self.queue.storage.read_text_or_none(SweepPaths(sweep_id).record)
            if raw is None:
                return None
            try:
                self._records[sweep_id] = SweepRecord.from_json(raw)
            except (ValidationError, ValueError) as e:
                log.warning("unreadable sweep record: sweep left alone", sweep_id=sweep_id,
                            error=str(e).splitlines()[0])
                return None
        return self._records[sweep_id]

    def trial_records(self, sweep_id: str) -> list[TrialRecord]:
        paths, found = SweepPaths(sweep_id), []
        for name in self.queue.storage.list_dir(paths.trials_dir):
            stem = name.removesuffix(".json")
            if not stem.isdigit():
                continue
            try:
                found.append(TrialRecord.from_json(
                    self.queue.storage.read_bytes(paths.trial(int(stem)))))
            except (FileNotFoundError, ValidationError, ValueError):
                continue  # being created without hard links: there at the next look
        return sorted(found, key=lambda t: t.n)

    def trials(self, sweep_id: str, values: bool = False) -> list[Trial]:
        """Every trial made so far, with its job's state (and, with `values`, its metric by
        epoch)."""
        record = self.record(sweep_id)
        metric = record.config.sweep.metric if record else "val_accuracy"
        found = []
        for t in self.trial_records(sweep_id):
            view = job_view(self.queue, t.job_id) if self.queue.known(t.job_id) else None
            found.append(Trial(t, view, epoch_values(self.queue, t.job_id, metric)
                               if values and view is not None else {}))
        return found

    def cancelled(self, sweep_id: str) -> bool:
        return self.queue.storage.exists(SweepPaths(sweep_id).cancel_request)

    # -- making trials ------------------------------------------------------------------------

    def top_up(self, sweep_id: str, by: str = "") -> list[Manifest]:
        """Create trials until `parallel` are in flight or the sweep has made all of them; queue
        a trial's job where its creator died before doing so. The manifests queued. A sweep
        that made all its trials and has none in flight (or is cancelled) is remembered as done:
        top_up_all looks at it no more."""
        record = self.record(sweep_id)
        if record is None or self.cancelled(sweep_id):
            self._done.add(sweep_id)
            return []
        spec, queued = record.config.sweep, []
        taken: set[int] = set()  # numbers another worker (or an unreadable file) holds
        while True:
            trials = self.trials(sweep_id, values=spec.method == "tpe")
            for trial in trials:
                if trial.view is None and age_seconds(self.queue.clock, trial.record.created_at) \
                        > ORPHAN_SECONDS:
                    queued.append(self._queue_trial(record, trial.record))
            # A trial paused at a rung holds no worker: ASHA fills its place with a new one.
            made = {t.record.n for t in trials}
            in_flight = sum(t.in_flight for t in trials)
            busy = sum(t.in_flight and not t.paused for t in trials)
            if len(made) >= record.trials and not in_flight and not queued:
                self._done.add(sweep_id)
            # The next number in the sweep's run order (a grid with early stopping runs its
            # combinations shuffled, numbered as written): the same on every worker.
            n = sweepspace.next_trial(spec, record.config.seed, made | taken)
            if n is None or len(made | taken) >= record.trials or busy >= spec.parallel:
                return queued
            past = [_past(t, spec.maximize) for t in trials]
            params = sweepspace.next_point(spec, n, record.config.seed, past)
            name = f"{record.name}-t{n}"
            trial = TrialRecord(sweep_id=sweep_id, n=n, params=params,
                                job_id=new_job_id(name, self.queue.clock.now()),
                                created_at=self.queue.clock.now(), created_by=by)
            if self.queue.storage.create_exclusive(SweepPaths(sweep_id).trial(n),
                                                   trial.to_json()):
                queued.append(self._queue_trial(record, trial))
                log.info("sweep trial queued", sweep_id=sweep_id, trial=n, params=params,
                         job_id=trial.job_id)
            else:  # another worker made trial n first; look again
                taken.add(n)

    def top_up_all(self, by: str = "") -> int:
        """top_up every sweep not known to be done; how many trials were queued."""
        return sum(len(self.top_up(sweep_id, by)) for sweep_id in self.sweep_ids()
                   if sweep_id not in self._done)

    def _queue_trial(self, record: SweepRecord, trial: TrialRecord) -> Manifest:
        spec = record.config.sweep
        config = sweepspace.trial_config(record.config, trial.params, trial.n)
        ref = SweepRef(id=record.sweep_id, trial=trial.n, params=trial.params,
                       metric=spec.metric, early_stop=spec.early_stop)
        return self.queue.submit(config, config_file=record.config_file,
                                 submitted_by=record.submitted_by,
                                 client_version=record.client_version, job_id=trial.job_id,
                                 sweep=ref)


def _past(trial: Trial, maximize: bool) -> sweepspace.Past:
    state = {JobState.succeeded: "complete", JobState.pruned: "pruned"}.get(
        trial.state, "running" if trial.in_flight else "failed")
    return sweepspace.Past(params=trial.record.params, value=trial.best(maximize), state=state)
