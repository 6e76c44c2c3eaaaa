"""The Colab runtime around a worker: its session cap, releasing it when idle, and what a job
cost in GPU hours and (approximately) in compute units."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import structlog

from cherry_train.places import on_colab
from cherry_train.schemas import TrainingConfig

log = structlog.get_logger(__name__)

#: Colab Pro ends a runtime after 24 hours (Colab Free: 12); the default cap on Colab.
COLAB_PRO_MAX_HOURS = 24.0
#: Setting up a job (copying data, building the model) before training starts, at most.
STARTUP_ALLOWANCE = timedelta(minutes=5)
#: Stop training this long before the cap: time to write a checkpoint and hand the job back.
STOP_MARGIN = timedelta(minutes=5)

#: Approximate compute units per hour by GPU, as Colab users observed them (2024-2025). Colab
#: publishes no table and changes rates; override with $CHERRY_CU_RATES, a JSON object of
#: {"name fragment": units per hour}, e.g. '{"A100": 11.8, "H100": 18}'.
DEFAULT_CU_RATES = {"T4": 1.8, "L4": 4.8, "V100": 4.9, "A100": 11.8}


@dataclass(frozen=True)
class RuntimeBudget:
    """How long this runtime may still run."""

    ends_at: datetime

    @classmethod
    def from_hours(cls, hours: float, started_at: datetime) -> RuntimeBudget:
        return cls(ends_at=started_at + timedelta(hours=hours))

    def remaining(self, now: datetime) -> timedelta:
        return self.ends_at - now

    def can_start(self, config: TrainingConfig, now: datetime) -> bool:
        """Only start a job that can reach its first checkpoint before the cap: the first
        time-based checkpoint comes after checkpoint.every_minutes of training at the latest."""
        needed = STARTUP_ALLOWANCE + timedelta(minutes=config.checkpoint.every_minutes)
        return self.remaining(now) >= needed + STOP_MARGIN

    def stop_at(self) -> datetime:
        return self.ends_at - STOP_MARGIN


def runtime_started_at(now: datetime) -> datetime:
    """When this machine's runtime started: on Colab the VM's boot (the session cap counts
    from there, not from when the worker cell ran), elsewhere now."""
    if on_colab():
        try:
            uptime = float(Path("/proc/uptime").read_text().split()[0])
            return now - timedelta(seconds=uptime)
        except (OSError, ValueError, IndexError):
            pass
    return now


def release_runtime() -> None:
    """Give the Colab runtime back, so compute units stop burning."""
    if not on_colab():
        log.info("idle shutdown: not on Colab, nothing to release; the worker exits")
        return
    from google.colab import runtime  # only importable on Colab

    log.info("idle shutdown: releasing the Colab runtime")
    runtime.unassign()


def cu_rates() -> dict[str, float]:
    rates = dict(DEFAULT_CU_RATES)
    override = os.environ.get("CHERRY_CU_RATES")
    if override:
        try:
            rates.update({str(k): float(v) for k, v in json.loads(override).items()})
        except (ValueError, AttributeError, TypeError):
            log.warning("CHERRY_CU_RATES is not a JSON object of numbers; using the defaults")
    return rates


def compute_units(device: str | None, gpu_hours: float) -> float | None:
    """Estimated compute units for `gpu_hours` on `device` (a GPU name), None if unknown."""
    if not device or gpu_hours <= 0:
        return None
    # Longest fragment first: "A100" must not be read as some shorter name inside it.
    for fragment, rate in sorted(cu_rates().items(), key=lambda kv: -len(kv[0])):
        if fragment.lower() in device.lower():
            return round(gpu_hours * rate, 3)
    return None


def default_max_runtime_hours() -> float | None:
    """The runtime cap a worker assumes when none is given: Colab Pro's on Colab, else none."""
    return COLAB_PRO_MAX_HOURS if on_colab() else None
