"""Early stopping of a sweep's trials, decided by the worker that trains one: at an epoch's end
it reads its sibling trials' metrics.jsonl from the queue root and applies the sweep's rule
(sweepspace.asha_stops or median_stops). No server: the files are the shared state, and a
sibling a heartbeat behind only makes the rule a little more lenient."""

from __future__ import annotations

from typing import Any

import structlog

from cherry_train import sweepspace
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.jobqueue.sweeps import Sweeps, epoch_values
from cherry_train.storage.base import Storage
from cherry_train.worker.job import Job

log = structlog.get_logger(__name__)


def stop_early(job: Job) -> dict[str, Any] | None:
    """After an epoch of a sweep trial with an early_stop rule: stop here? (See early_stop.)"""
    ref = job.claim.manifest.sweep
    if ref is None or ref.early_stop is None:
        return None
    return early_stop(job.claim.manifest, job.state.epoch, job.cfg.training.epochs,
                      job.state.last_epoch[ref.metric], job.reporter.owner.reader)


def early_stop(manifest, epoch: int, epochs: int, value: float,
               reader: Storage) -> dict[str, Any] | None:
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
    others = []
    for trial in Sweeps(files).trial_records(ref.id):
        if trial.job_id != manifest.job_id:
            values = epoch_values(files, trial.job_id, ref.metric)
            if epoch in values:
                others.append(values[epoch])
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
