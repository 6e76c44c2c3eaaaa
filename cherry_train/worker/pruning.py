"""Early stopping of a sweep's trials, decided by the worker that trains one: at an epoch's end
it reads its sibling trials' metrics.jsonl from the queue root and applies the sweep's rule
(sweepspace.asha_stops or median_stops). No server: the files are the shared state, and a
sibling a heartbeat behind only makes the rule a little more lenient.

A trial that reaches an ASHA rung before `reduction` trials have would go on whatever it is
worth (the best of one is itself), so the first trials of a sweep would run long: it waits
instead, up to early_stop.wait_minutes, for the siblings that are training toward the rung
right now, and is then judged among them. Siblings that wait themselves, are queued, or are
silent are not waited for, so workers that all wait never wait for each other."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog

from cherry_train import sweepspace
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.jobqueue.sweeps import Sweeps, epoch_values
from cherry_train.jobqueue.views import job_view
from cherry_train.schemas import JobState, Phase
from cherry_train.storage.base import Storage
from cherry_train.worker.job import Job

log = structlog.get_logger(__name__)

#: How often a trial waiting at a rung looks at its siblings again (a few reads each).
WAIT_POLL_SECONDS = 10.0


def stop_early(job: Job) -> dict[str, Any] | None:
    """After an epoch of a sweep trial with an early_stop rule: stop here? (See early_stop.)"""
    ref = job.claim.manifest.sweep
    if ref is None or ref.early_stop is None:
        return None
    def wait(seconds: float) -> bool:
        job.reporter.update(phase=Phase.waiting_for_siblings)
        return job.stop.wait(seconds)  # True: a stop was asked for; it is handled as always

    decision = early_stop(job.claim.manifest, job.state.epoch, job.cfg.training.epochs,
                          job.state.last_epoch[ref.metric], job.reporter.owner.reader, wait)
    job.reporter.update(phase=Phase.training)
    return decision


def early_stop(manifest, epoch: int, epochs: int, value: float, reader: Storage,
               wait: Callable[[float], bool] | None = None) -> dict[str, Any] | None:
    """Whether a trial that just finished `epoch` (1-based) with `value` of its sweep's metric
    stops here: the decision and the figures it used, or None to go on."""
    ref = manifest.sweep
    if ref is None or ref.early_stop is None or epoch >= epochs:
        return None
    rule, maximize = ref.early_stop, ref.metric == "val_accuracy"
    if rule.method == "asha" and epoch not in sweepspace.rungs(rule.grace_epochs,
                                                               rule.reduction, epochs):
        return None
    if rule.method == "median" and epoch < rule.grace_epochs:
        return None
    files = JobQueue(reader)
    deadline = time.monotonic() + rule.wait_minutes * 60
    while True:
        others, coming = _siblings(files, manifest, epoch)
        if rule.method != "asha" or len(others) + 1 >= rule.reduction or not coming or \
                wait is None or time.monotonic() >= deadline:
            break
        log.info("early stop: waiting for the trials training toward this rung",
                 epoch=epoch, reached=len(others) + 1, training_toward_it=coming)
        if wait(WAIT_POLL_SECONDS):
            return None  # a stop (signal, cancel): the attempt ends as it always does
    if rule.method == "asha":
        stop, cutoff = sweepspace.asha_stops(value, others, rule.reduction, maximize)
    elif len(others) < rule.min_trials:
        return None
    else:
        stop, cutoff = sweepspace.median_stops(value, others, maximize)
    decision = {"method": rule.method, "epoch": epoch, "metric": ref.metric,
                "value": round(value, 6), "cutoff": round(cutoff, 6),
                "trials_compared": len(others) + 1, "sweep_id": ref.id}
    log.info("early stop: this trial stops here" if stop else "early stop: this trial goes on",
             **decision)
    return decision if stop else None


def _siblings(files: JobQueue, manifest, epoch: int) -> tuple[list[float], int]:
    """The siblings' metric at `epoch` (those that reached it), and how many others are
    training toward it now (running, heartbeat fresh, not waiting at a rung themselves)."""
    ref, others, coming = manifest.sweep, [], 0
    for trial in Sweeps(files).trial_records(ref.id):
        if trial.job_id == manifest.job_id:
            continue
        values = epoch_values(files, trial.job_id, ref.metric)
        if epoch in values:
            others.append(values[epoch])
            continue
        view = job_view(files, trial.job_id) if files.known(trial.job_id) else None
        hb = view.heartbeat if view is not None else None
        if view is not None and view.state == JobState.running and not view.stalled and \
                hb is not None and not hb.released and hb.phase != Phase.waiting_for_siblings:
            coming += 1
    return others, coming
