"""`cherry status`: every job's state, derived from the files alone (docs/contract.md §3).

A finished job's row is kept in a small local cache, with its result.json's size and time: with
hundreds of finished jobs on a Drive mount, a status call reads only the jobs still in motion,
and a row whose result changed (`cherry retry`, and the run after it) is read again.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import platformdirs

from cherry_train import files
from cherry_train.client.submit import WORKER_FRESH_SECONDS
from cherry_train.jobqueue import layout
from cherry_train.jobqueue.clock import age_seconds
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.jobqueue.views import (
    REJECTED,
    JobView,
    all_job_ids,
    job_view,
    queued_job_ids,
)
from cherry_train.jobqueue.workercontrol import drain_requests
from cherry_train.schemas import JobState, Phase, WorkerState
from cherry_train.schemas.requires import Capabilities
from cherry_train.sizes import human_bytes
from cherry_train.storage import FileInfo, Storage

STATUS_THREADS = 16
#: The cache's layout; a file of another version (or none) is read as empty.
CACHE_VERSION = 2


def _cache_path(queue: JobQueue) -> Path:
    base = os.environ.get("CHERRY_CACHE_DIR") or platformdirs.user_cache_path("cherry-train")
    key = hashlib.sha1(queue.storage.description.encode()).hexdigest()[:16]
    return Path(base) / "status" / f"{key}.json"


def _identity(info: FileInfo | None) -> list | None:
    """What tells one result.json from the next: a retried job's new result is a new file."""
    return None if info is None else [info.size, info.modified.isoformat()]


def _read_cache(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    ok = isinstance(data, dict) and data.get("version") == CACHE_VERSION
    return data["jobs"] if ok and isinstance(data.get("jobs"), dict) else {}


def job_rows(queue: JobQueue, use_cache: bool = True) -> list[dict[str, Any]]:
    """One dict per job, newest first: the `status --json` schema."""
    cache_file = _cache_path(queue)
    cache = _read_cache(cache_file) if use_cache else {}
    # Each job's result.json, before any job is read: a result newer than this is seen as
    # changed at the next call. Cheap: local stats, or a few searches on a Drive API root.
    results = {j: _identity(i) for j, i in
               queue.storage.stat_in_subfolders(layout.DONE, "result.json").items()} \
        if use_cache else {}
    queued = queued_job_ids(queue)
    job_ids = all_job_ids(queue)
    # A cached row holds while its result is the same file and its manifest is not queued
    # again (a retry puts it back in queue/, then the next run writes a new result).
    kept = {j: e["row"] for j in job_ids if isinstance(e := cache.get(j), dict)
            and j not in queued and e.get("result") == results.get(j) and "row" in e}
    todo = [j for j in job_ids if j not in kept]
    # Each view is a few small reads: on a network mount, round trips. Overlap them.
    with ThreadPoolExecutor(STATUS_THREADS) as pool:
        rows = pool.map(lambda j: _row(job_view(queue, j), queue.footprint(j)), todo)
        fresh = dict(zip(todo, rows, strict=True))
    if use_cache:
        new = {j: cache[j] for j in kept}
        new.update({j: {"result": results.get(j), "row": row} for j, row in fresh.items()
                    if JobState(row["state"]).finished and j not in queued})
        if new != cache:
            files.write_atomic(cache_file, json.dumps(
                {"version": CACHE_VERSION, "jobs": new}).encode())
    return [kept.get(j) or fresh[j] for j in job_ids]


def _row(v: JobView, footprint: tuple[int, int] = (0, 0)) -> dict[str, Any]:
    hb, result, manifest = v.heartbeat, v.result, v.manifest
    row: dict[str, Any] = {
        "job_id": v.job_id,
        "state": v.state.value,
        "stalled": v.stalled,
        "name": manifest.name if manifest else None,
        "priority": manifest.priority if manifest else None,
        "attempt": v.attempt.n if v.attempt else (result.attempts if result else None),
        "worker_id": v.attempt.worker_id if v.attempt else (result.worker_id if result else None),
        "heartbeat_age_seconds": round(v.heartbeat_age, 1) if v.heartbeat_age is not None
        else None,
        "phase": None, "epoch": None, "epochs": manifest.config.epochs if manifest else None,
        "step": None, "total_steps": None, "loss": None, "accuracy": None,
        "images_per_second": None, "eta_seconds": None, "device": None,
        "best_val_accuracy": None, "error": v.error, "error_type": v.error_type,
        "cancel_requested": v.cancel_requested,
        "sweep_id": manifest.sweep.id if manifest and manifest.sweep else None,
        "trial": manifest.sweep.trial if manifest and manifest.sweep else None,
        "storage_error": None, "last_checkpoint_step": None,
        "bytes": footprint[0], "checkpoint_bytes": footprint[1], "released": False,
        "requires": manifest.config.requires.model_dump(exclude_defaults=True) or None
        if manifest else None,
        "waiting": None,  # client/waiting.py: why no live worker takes a queued job
    }
    if hb is not None and v.state.value == "running":
        row.update(phase=hb.phase, epoch=hb.epoch, step=hb.step,
                   total_steps=hb.epochs * hb.steps_per_epoch or None, loss=hb.loss,
                   accuracy=hb.accuracy, images_per_second=hb.images_per_second,
                   eta_seconds=hb.eta_seconds, device=hb.device,
                   best_val_accuracy=hb.best_val_accuracy, storage_error=hb.storage_error,
                   last_checkpoint_step=hb.last_checkpoint_step)
        if hb.released:  # nobody trains it: no ETA, no speed, and say what it waits for
            row.update(released=True, eta_seconds=None, images_per_second=None)
            if hb.error is not None:
                row["error"] = f"{hb.error.type}: {hb.error.message}"
    if result is not None:
        # loss and accuracy are the training set's, running or finished: one meaning per
        # column. The validation figure is best_val_accuracy.
        row.update(epoch=result.epochs_completed, step=result.steps_completed,
                   device=result.device, images_per_second=result.images_per_second,
                   loss=result.final_metrics.get("train_loss"),
                   accuracy=result.final_metrics.get("train_accuracy"),
                   best_val_accuracy=result.best.val_accuracy if result.best else None)
        row["epochs"] = result.epochs or row["epochs"]
        if result.evaluation:  # an evaluation: its accuracy is the number people want
            row.update(best_val_accuracy=result.evaluation.get("accuracy"),
                       evaluation_accuracy=result.evaluation.get("accuracy"),
                       images_per_second=result.evaluation.get("images_per_second_batch64"))
    return row


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _bar(done: int | None, total: int | None, width: int = 10) -> str:
    if not done or not total:
        return "-"
    filled = round(width * min(done, total) / total)
    return "#" * filled + "." * (width - filled)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_table(rows: list[dict[str, Any]], workers: list[dict[str, Any]],
                 only: str | None = None) -> str:
    """The jobs (those in state `only`, when status filters), what they hold, the workers."""
    if not rows:
        lines = [f"no {only} jobs" if only else "no jobs"]
    else:
        header = ("JOB", "STATE", "TRY", "PROGRESS", "EPOCH", "TRAIN LOSS", "TRAIN ACC",
                  "BEST VAL", "IMG/S", "ETA", "WORKER", "GPU", "HEARTBEAT")
        table = [header]
        for r in rows:
            released = r.get("released", False)
            running = r["state"] == "running" and not released
            paused = released and r["phase"] == Phase.paused
            state = ("paused at a rung" if paused else "waiting (handed back)" if released
                     else r["state"]) + \
                (" (stalled)" if r["stalled"] and not released else "") + \
                (" (cancelling)" if r["cancel_requested"] and running else "")
            epoch = (f"{r['epoch']}/{r['epochs']}"
                     if r["epoch"] is not None and r["epochs"] else "-")
            table.append((
                r["job_id"], state, str(r["attempt"] or "-"),
                _bar(r["step"], r["total_steps"]) if running else "-", epoch,
                _fmt(r["loss"], ".4f"), _fmt(r["accuracy"], ".3f"),
                _fmt(r["best_val_accuracy"], ".3f"), _fmt(r["images_per_second"], ".0f"),
                _age(r["eta_seconds"]) if running else "-", r["worker_id"] or "-",
                (r["device"] or "-").replace("NVIDIA ", ""),
                _age(r["heartbeat_age_seconds"]) if running else "-",
            ))
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                 for row in table]
        for r in rows:
            if r["stalled"]:
                lines.append(f"! {r['job_id']}: no heartbeat for {_age(r['heartbeat_age_seconds'])}"
                             f" - its worker ({r['worker_id']}) is probably gone; the next worker"
                             " start takes it over and resumes from the last checkpoint")
            elif r["state"] == "failed" and r["error"]:
                lines.append(f"! {r['job_id']} failed: {r['error'].splitlines()[0]} ("
                             f"{failure_advice(r['job_id'], r.get('error_type'), r['error'])})")
            elif r.get("waiting"):
                lines.append(f"! {r['job_id']}: {r['waiting']}")
            elif r.get("released") and r["phase"] != Phase.paused:
                why = f"after an error: {r['error'].splitlines()[0]}" if r["error"] else \
                    "(its worker was stopped)"
                lines.append(f"! {r['job_id']}: handed back {why}; waits for a worker to resume "
                             f"it from step {r['last_checkpoint_step'] or 0}")
            if r["storage_error"] and r["state"] == "running":
                warning = storage_warning(r["storage_error"], r["last_checkpoint_step"])
                lines.append(f"! {r['job_id']}: {warning}")
    if rows:
        lines.append(usage_line(rows, only))
    lines.append("")
    if workers:
        lines.append("workers: " + ", ".join(
            f"{w['worker_id']} ({w['state']}"
            + (f", {Capabilities.model_validate(w['capabilities']).describe()}"
               if w.get("capabilities") else "")
            + f", seen {_age(w['age_seconds'])} ago"
            + (f", on {w['job_id']}" if w["job_id"] and w["state"] in ("busy", "draining")
               else "") + ")"
            for w in workers))
    else:
        lines.append("workers: none has written a heartbeat to this root yet")
    return "\n".join(lines)


#: Fields whose problem only a changed config mends: `cherry retry` runs the same config, and
#: fails the same way (an unknown model, a size it cannot train at, weights of another model).
CONFIG_ONLY = ("model.name", "model.num_classes", "data.image_size", "evaluate")


def failure_advice(job_id: str, error_type: str | None, error: str | None) -> str:
    """What to do about a failed job, by why it failed: `cherry retry` only where running it
    again can succeed (a crash loop, a fault outside the job, data or files put right)."""
    if error_type == REJECTED:
        return "no worker could read its manifest: fix the config and submit it again"
    if error_type != "JobError":  # worker/errors.py's: the job's own config or data
        return f"`cherry retry {job_id}` runs it again from its newest checkpoint"
    field = (error or "").split(":", 1)[0].strip()
    # A package missing on the worker ("pip install ...") is mended there, not in the config.
    if field in CONFIG_ONLY and "pip install" not in (error or ""):
        return f"fix {field} in the config and submit it again"
    return (f"once what it names is put right: `cherry retry {job_id}` if that was the data or "
            "a file, or the config fixed and submitted again")


def usage_line(rows: list[dict[str, Any]], state: str | None = None) -> str:
    """What the jobs cost in Drive space (a free account has 15 GB); with a state filter,
    the jobs shown."""
    total = sum(r.get("bytes") or 0 for r in rows)
    checkpoints = sum(r.get("checkpoint_bytes") or 0 for r in rows)
    what = f"{state} job" if state else "job"
    jobs = f"{len(rows)} {what} holds" if len(rows) == 1 else f"{len(rows)} {what}s hold"
    line = f"storage: {jobs} {human_bytes(total)}"
    if checkpoints:
        line += (f", {human_bytes(checkpoints)} of it checkpoints (kept for resume; removed "
                 "when a job succeeds, the newest kept when it fails or is cancelled)")
    return line


def storage_warning(error: str, last_step: int | None) -> str:
    return (f"{error}. A disconnect now would resume from step {last_step or 0}. Is the queue "
            "root's storage full, or its mount down?")


def worker_rows(queue: JobQueue) -> list[dict[str, Any]]:
    """The workers, newest status first. One asked to drain (`cherry drain`) that has not
    noticed yet is shown draining at once: it will not take a new job."""
    drains = drain_requests(queue)
    return [{"worker_id": w.worker_id, "host": w.host, "job_id": w.job_id,
             "capabilities": w.capabilities.model_dump() if w.capabilities else None,
             "live": w.state != WorkerState.stopped and
             age_seconds(queue.clock, w.at) < WORKER_FRESH_SECONDS,
             "state": WorkerState.draining.value if w.worker_id in drains and
             w.state in (WorkerState.idle, WorkerState.busy) else w.state,
             "age_seconds": round(age_seconds(queue.clock, w.at), 1)}
            for w in sorted(queue.workers(), key=lambda w: w.at, reverse=True)]


def free_space(storage: Storage) -> str:
    """' (N free)' for the root line: a queued job that cannot fit waits for space (the worker
    compares its footprint with this). Nothing where it is unknown; never an error."""
    try:
        free = storage.free_bytes()
    except Exception:  # the status of the jobs matters more
        return ""
    return "" if free is None else f" ({human_bytes(free)} free)"
