"""`cherry status`: every job's state, derived from the files alone (DESIGN.md §3)."""

from __future__ import annotations

from typing import Any

from cherry_train.jobqueue.clock import age_seconds
from cherry_train.jobqueue.protocol import JobQueue, JobView


def job_rows(queue: JobQueue) -> list[dict[str, Any]]:
    """One dict per job, newest first: the `status --json` schema."""
    return [_row(queue.view(job_id)) for job_id in queue.job_ids()]


def _row(v: JobView) -> dict[str, Any]:
    hb, result = v.heartbeat, v.result
    row: dict[str, Any] = {
        "job_id": v.job_id,
        "state": v.state.value,
        "stalled": v.stalled,
        "name": v.manifest.name if v.manifest else None,
        "priority": v.manifest.priority if v.manifest else None,
        "attempt": v.attempt.n if v.attempt else (result.attempts if result else None),
        "worker_id": v.attempt.worker_id if v.attempt else (result.worker_id if result else None),
        "heartbeat_age_seconds": round(v.heartbeat_age, 1) if v.heartbeat_age is not None else None,
        "epoch": None, "epochs": None, "step": None, "loss": None,
        "images_per_second": None, "eta_seconds": None, "device": None,
        "best_val_accuracy": None, "error": v.error,
        "cancel_requested": v.cancel_requested,
    }
    if hb is not None and v.state.value == "running":
        row.update(epoch=hb.epoch, epochs=hb.epochs, step=hb.step, loss=hb.loss,
                   images_per_second=hb.images_per_second, eta_seconds=hb.eta_seconds,
                   device=hb.device, best_val_accuracy=hb.best_val_accuracy)
    if result is not None:
        row.update(epoch=result.epochs_completed, device=result.device,
                   images_per_second=result.images_per_second,
                   best_val_accuracy=result.best.val_accuracy if result.best else None)
        if v.manifest:
            row["epochs"] = v.manifest.config.training.epochs
    return row


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def render_table(rows: list[dict[str, Any]], workers: list[dict[str, Any]]) -> str:
    if not rows:
        lines = ["no jobs"]
    else:
        header = ("JOB", "STATE", "TRY", "EPOCH", "LOSS", "BEST ACC", "IMG/S", "ETA", "HEARTBEAT")
        table = [header]
        for r in rows:
            state = r["state"] + (" (stalled)" if r["stalled"] else "") + \
                (" (cancelling)" if r["cancel_requested"] and r["state"] == "running" else "")
            epoch = (f"{r['epoch'] + (1 if r['state'] == 'running' else 0)}/{r['epochs']}"
                     if r["epoch"] is not None and r["epochs"] else "-")
            table.append((
                r["job_id"], state, str(r["attempt"] or "-"), epoch,
                f"{r['loss']:.4f}" if r["loss"] is not None else "-",
                f"{r['best_val_accuracy']:.3f}" if r["best_val_accuracy"] is not None else "-",
                f"{r['images_per_second']:.0f}" if r["images_per_second"] else "-",
                _age(r["eta_seconds"]) if r["state"] == "running" else "-",
                _age(r["heartbeat_age_seconds"]) if r["state"] == "running" else "-",
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
                lines.append(f"! {r['job_id']} failed: {r['error'].splitlines()[0]}")
    lines.append("")
    if workers:
        lines.append("workers: " + ", ".join(
            f"{w['worker_id']} ({w['state']}, seen {_age(w['age_seconds'])} ago"
            + (f", on {w['job_id']}" if w["job_id"] and w["state"] == "busy" else "") + ")"
            for w in workers))
    else:
        lines.append("workers: none has written a heartbeat to this root yet")
    return "\n".join(lines)


def worker_rows(queue: JobQueue) -> list[dict[str, Any]]:
    return [{"worker_id": w.worker_id, "state": w.state, "host": w.host, "job_id": w.job_id,
             "age_seconds": round(age_seconds(queue.clock, w.at), 1)}
            for w in sorted(queue.workers(), key=lambda w: w.at, reverse=True)]
