"""Early stopping of a sweep's trials, decided by the workers: the files are the shared state
(each trial's metrics.jsonl, its job's result), and there is no server.

ASHA as its paper has it (Li et al., 2018), with the queue as its scheduler: at a rung (epochs
grace_epochs x reduction^k) a trial goes on only in the top 1/reduction of the trials that
reached that rung. Below the cut it *pauses*: its worker releases it, with a checkpoint of the
rung, and takes other work (a sweep's next trial), while the paused job waits in queue/. A
worker that polls claims a paused trial only once it is promoted (later trials at the rung
moved the cut past it) or once the rung is complete (every trial of the sweep reached it or
ended): then the cut is final, and the trial is pruned. The worker that claims it judges it
again, so two workers reading at different moments never disagree for long.

The median rule needs no pause: a trial worse than the median of the others stops at once.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import structlog

from cherry_train import sweepspace
from cherry_train.jobqueue.layout import JobPaths
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.jobqueue.sweeps import Sweeps, epoch_records, paused
from cherry_train.schemas import Manifest
from cherry_train.schemas.records import AttemptEnd
from cherry_train.sweepspace import Rank

if TYPE_CHECKING:
    from cherry_train.worker.training.job import TrainingJob

log = structlog.get_logger(__name__)

GO, PAUSE, PRUNE = "go", "pause", "prune"
#: How long one reading of a sweep's files serves the paused trials a poll looks at.
SNAPSHOT_SECONDS = 5.0


def judge(files: JobQueue, manifest: Manifest, epoch: int,
          sweep: SweepFiles | None = None) -> tuple[str, dict[str, Any]] | None:
    """A sweep trial that finished `epoch` (1-based): "go" on, "pause" (ASHA, below the cut
    for now) or "prune", with the figures the rule used; None where no rule applies (not a
    sweep trial, not a rung, the last epoch). `sweep`: its files as read a moment ago."""
    if not applies(manifest, epoch):
        return None
    ref = manifest.sweep
    rule, maximize = ref.early_stop, ref.metric == "val_accuracy"
    sweep = sweep or SweepFiles(files, ref.id, ref.metric)
    own, others, complete = sweep.rung(manifest.job_id, epoch, maximize)
    if own is None:  # its metrics.jsonl has not got this epoch: nothing to judge by
        return None
    promoted = 0
    if rule.method == "asha":
        promoted = sweep.promoted(manifest.job_id, epoch)
        verdict, cut = sweepspace.asha_verdict(own, others, rule.reduction, maximize,
                                               complete, promoted)
        cutoff = cut[0] if cut is not None else None
    elif len(others) < rule.min_trials:
        return None
    else:
        stop, cutoff = sweepspace.median_stops(own[0], [o[0] for o in others], maximize)
        verdict = PRUNE if stop else GO
    figures = {"method": rule.method, "epoch": epoch, "metric": ref.metric,
               "value": round(own[0], 6),
               "cutoff": round(cutoff, 6) if cutoff is not None else None,
               "trials_compared": len(others) + 1, "promoted_before": promoted,
               "rung_complete": complete,
               "sweep_id": ref.id}
    return verdict, figures


def applies(manifest: Manifest, epoch: int) -> bool:
    """Whether the trial's rule judges it after `epoch`: an ASHA rung, or (median) any epoch
    from grace_epochs on; never the last epoch, where nothing is left to save."""
    ref = manifest.sweep
    epochs = manifest.config.training.epochs
    if ref is None or ref.early_stop is None or epoch >= epochs:
        return False
    rule = ref.early_stop
    if rule.method == "asha":
        return epoch in sweepspace.rungs(rule.grace_epochs, rule.reduction, epochs)
    return epoch >= rule.grace_epochs


class SweepFiles:
    """One sweep's trials and their metric by epoch, read once: what every rung of it is
    judged by. Which trials ended is read only for those a rung misses."""

    def __init__(self, files: JobQueue, sweep_id: str, metric: str):
        sweeps = Sweeps(files)
        self.files, self.record = files, sweeps.record(sweep_id)
        self.trials = sweeps.trial_records(sweep_id)
        self.values = {t.job_id: _keys(epoch_records(files, t.job_id), metric)
                       for t in self.trials}
        self._ended: dict[str, bool] = {}
        self._paused: dict[str, bool] = {}  # for trials whose last epoch is a rung

    def rung(self, job_id: str, epoch: int,
             maximize: bool) -> tuple[Rank | None, list[Rank], bool]:
        """The trial's best metric up to `epoch`, its siblings' (those that reached it), and
        whether the rung is complete: every trial of the sweep is made and has reached
        `epoch` or ended."""
        complete = self.record is not None and len(self.trials) >= self.record.trials
        own, others = None, []
        for trial in self.trials:
            value = sweepspace.best_until(self.values[trial.job_id], epoch, maximize)
            if trial.job_id == job_id:
                own = value
            elif value is not None:
                others.append(value)
            elif complete and not self._has_ended(trial.job_id):
                complete = False  # still on its way to this rung (or paused below it)
        return own, others, complete

    def promoted(self, job_id: str, epoch: int) -> int:
        """How many other trials went on from the rung at `epoch`: those with a later epoch,
        and those at the rung that neither ended there nor wait there paused (they train
        toward the next rung now: their heartbeat says so)."""
        count = 0
        for trial in self.trials:
            values = self.values[trial.job_id]
            if trial.job_id == job_id or epoch not in values:
                continue
            if max(values) > epoch:
                count += 1
            elif not self._has_ended(trial.job_id):
                count += not self._is_paused(trial.job_id)
        return count

    def _is_paused(self, job_id: str) -> bool:
        if job_id not in self._paused:
            self._paused[job_id] = paused(self.files.heartbeat(job_id))
        return self._paused[job_id]

    def _has_ended(self, job_id: str) -> bool:
        if job_id not in self._ended:
            self._ended[job_id] = self.files.storage.exists(JobPaths(job_id).result)
        return self._ended[job_id]


def _keys(records: dict[int, dict], metric: str) -> dict[int, tuple[float, float]]:
    """Each epoch's rank key: the metric, then the other validation figure in the same
    direction ((accuracy, -loss) or (loss, -accuracy)). Early on many trials sit at the same
    chance-level accuracy; their losses still tell them apart."""
    other, keys = "val_loss" if metric == "val_accuracy" else "val_accuracy", {}
    for epoch, r in records.items():
        if isinstance(r.get(metric), int | float):
            tie = r.get(other)
            keys[epoch] = (float(r[metric]), -float(tie) if isinstance(tie, int | float)
                           else float("-inf"))
    return keys


class Promotions:
    """Which paused trials a worker may claim now: those promoted, and those whose rung is
    complete (to be pruned); a cancelled one try_claim ends before asking. A "not yet" is
    remembered for `recheck_seconds` (the worker's longest idle poll), and a sweep's files are
    read once per look however many of its trials wait: on a Drive root a look is tens of
    requests. The worker forgets it all when its own work may have moved a cut (`forget`)."""

    def __init__(self, files: JobQueue, recheck_seconds: float):
        self.files, self.recheck_seconds = files, recheck_seconds
        self._not_before: dict[str, float] = {}  # job id -> when to look again
        self._sweeps: dict[str, tuple[float, SweepFiles]] = {}

    def ready(self, manifest: Manifest, last: AttemptEnd | None) -> bool:
        if not paused(last) or manifest.sweep is None:
            return True
        now = time.monotonic()
        ref = manifest.sweep
        seen = self._sweeps.get(ref.id)
        if seen is None or now - seen[0] >= min(self.recheck_seconds, SNAPSHOT_SECONDS):
            seen = self._sweeps[ref.id] = (now, SweepFiles(self.files, ref.id, ref.metric))
        values = seen[1].values.get(manifest.job_id)
        verdict = judge(self.files, manifest, max(values), seen[1]) if values else None
        if verdict is not None and verdict[0] == PAUSE:
            self._not_before[manifest.job_id] = now + self.recheck_seconds
            return False
        return True

    def waiting(self, job_id: str) -> bool:
        """Found paused and not ready at the last look, which was a moment ago."""
        return time.monotonic() < self._not_before.get(job_id, 0.0)

    def forget(self) -> None:
        self._not_before.clear()
        self._sweeps.clear()


# -- the trainer's two questions ------------------------------------------------------------------

def at_epoch_end(job: TrainingJob) -> tuple[str, dict[str, Any]] | None:
    """After each epoch of a trial: pause or prune it here? None: it goes on."""
    manifest = job.claim.manifest
    if not applies(manifest, job.state.epoch):
        return None
    job.reporter.sync_metrics()  # the siblings, and this judgement, read this epoch from the root
    return _told(judge(JobQueue(job.reporter.owner.reader), manifest, job.state.epoch))


def after_resume(job: TrainingJob) -> tuple[str, dict[str, Any]] | None:
    """A trial that was paused at a rung, claimed again: judged again at once (promoted, or
    pruned, or paused again where the cut moved back above it since its claimer looked)."""
    if not paused(job.claim.attempt.previous):
        return None
    return _told(judge(JobQueue(job.reporter.owner.reader), job.claim.manifest, job.state.epoch))


def _told(verdict: tuple[str, dict[str, Any]] | None) -> tuple[str, dict[str, Any]] | None:
    if verdict is None:
        return None
    action, figures = verdict
    log.info({GO: "early stop: this trial goes on", PAUSE: "early stop: this trial pauses at "
              "the rung until its siblings catch up; the worker takes other work",
              PRUNE: "early stop: this trial stops here"}[action], **figures)
    return None if action == GO else verdict
