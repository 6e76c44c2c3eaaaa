"""Why a queued job waits although workers are live: its `requires:` (a GPU, its memory, bf16,
a number of GPUs) against what each live worker published. Read by `cherry status`."""

from __future__ import annotations

from typing import Any

from cherry_train.schemas.requires import Capabilities, RequiresSection


def waiting_reason(requires: dict | None, workers: list[dict[str, Any]]) -> str | None:
    """"waiting: no worker with gpu_memory_gb >= 24 (colab-1: 1x Tesla T4 15.8 GB)" when no
    live worker meets the job's requirements; None when one does, when the job requires
    nothing, or when there is no live worker to compare with (the workers line says so)."""
    if not requires:
        return None
    wanted = RequiresSection.model_validate(requires)
    live = [w for w in workers if w.get("live")]
    taking = [w for w in live if w.get("state") != "draining"]  # draining: takes no new job
    if live and not taking:
        return "waiting: every live worker is draining"
    if not live or any(w.get("capabilities") is None for w in taking):
        return None  # a worker that did not say what it has may well run it
    lacking: list[str] = []
    seen = []
    for w in taking:
        has = Capabilities.model_validate(w["capabilities"])
        unmet = wanted.unmet(has)
        if not unmet:
            return None
        lacking += [u for u in unmet if u not in lacking]
        seen.append(f"{w['worker_id']}: {has.describe()}")
    return f"waiting: no worker with {', '.join(lacking)} ({'; '.join(seen)})"


def mark_waiting(rows: list[dict[str, Any]], workers: list[dict[str, Any]]) -> None:
    """Set each queued row's `waiting` (status --json has it too)."""
    for r in rows:
        if r["state"] == "queued":
            r["waiting"] = waiting_reason(r.get("requires"), workers)
