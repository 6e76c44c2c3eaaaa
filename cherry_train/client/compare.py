"""`cherry compare`: the hyperparameters that differ between jobs, their key results, and one
picture overlaying their curves."""

from __future__ import annotations

import json
from typing import Any

from cherry_train.jobqueue.layout import JobPaths
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.jobqueue.views import job_view

#: Never "differences" worth a column: the name is shown anyway.
IGNORED = {"name"}


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def comparison(queue: JobQueue, job_ids: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """(the config fields that differ, one row per job with those fields and the results)."""
    views = [job_view(queue, j) for j in job_ids]
    configs = [_flatten(v.manifest.config.model_dump(mode="json")) if v.manifest else {}
               for v in views]
    keys = sorted({k for c in configs for k in c} - IGNORED)
    differing = [k for k in keys if len({json.dumps(c.get(k)) for c in configs}) > 1]
    rows = []
    for view, config in zip(views, configs, strict=True):
        r = view.result
        rows.append({
            "job_id": view.job_id, "name": view.manifest.name if view.manifest else None,
            "state": view.state.value, **{k: config.get(k) for k in differing},
            "best_val_accuracy": r.best.val_accuracy if r and r.best else None,
            "best_epoch": r.best.epoch if r and r.best else None,
            "best_val_loss": r.best.val_loss if r and r.best else None,
            "final_val_accuracy": r.final_metrics.get("val_accuracy") if r else None,
            "epochs_completed": r.epochs_completed if r else None,
            "images_per_second": r.images_per_second if r else None,
            "wall_seconds": r.wall_seconds if r else None,
            "dataset_sha256": (r.dataset_sha256 or "")[:12] if r else None,
        })
    return differing, rows


def render(differing: list[str], rows: list[dict[str, Any]], first: tuple[str, ...] = (),
           extra: tuple[str, ...] = ()) -> str:
    """The table; `first` columns go before the job id, `extra` after the differing fields."""
    columns = [*first, "job_id", "state", *differing, *extra, "best_val_accuracy",
               "best_epoch", "best_val_loss", "epochs_completed", "images_per_second",
               "wall_seconds"]
    if any(r["final_val_accuracy"] not in (None, r["best_val_accuracy"]) for r in rows):
        # the last epoch fell back from the best one (overfitting, a noisy end): worth a column
        columns.insert(columns.index("best_epoch") + 1, "final_val_accuracy")
    if len({r["dataset_sha256"] for r in rows if r["dataset_sha256"]}) > 1:  # jobs that ran
        columns.append("dataset_sha256")  # different data: say so, it explains a lot
    headers = [c.upper() if c in ("job_id", "state") else c for c in columns]
    table = [headers] + [[_cell(r[c]) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
             for row in table]
    if not differing:
        lines.append("(the configs are the same, apart from the name)")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def overlay_png(queue: JobQueue, job_ids: list[str]) -> bytes:
    from cherry_train.plots import render_overlay

    series = {}
    for job_id in job_ids:
        raw = queue.storage.read_text_or_none(JobPaths(job_id).metrics) or ""
        epochs = [r for r in map(json.loads, filter(None, raw.splitlines()))
                  if r.get("kind") == "epoch"]
        view = job_view(queue, job_id)
        label = f"{view.manifest.name if view.manifest else '?'} ({job_id[-4:]})"
        series[label] = epochs
    drawn = {label: epochs for label, epochs in series.items() if epochs}
    title = f"{len(drawn)} jobs"
    if len(drawn) < len(series):  # in the legend with no line, they only puzzled people
        title += f" (no epoch yet: {', '.join(lb for lb in series if lb not in drawn)})"
    return render_overlay(drawn, title=title)
