"""The laptop side of sweeps: `--sweep PATH=V1,V2` flags, finding a sweep by a short id, its
trials ranked by the sweep's metric, the best trial's config as YAML, and one line per sweep
for `cherry status`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from cherry_train import sweepspace
from cherry_train.client.submit import check_model_name
from cherry_train.jobqueue.sweeps import Sweeps, Trial
from cherry_train.schemas import ConfigError, TrainingConfig, validate_config

PREFIX = "sweep:"


def with_sweep_flags(config: TrainingConfig, flags: list[str]) -> TrainingConfig:
    """`--sweep training.learning_rate=1e-3,3e-4` flags added to the config's sweep section
    (a grid sweep if it has none): each value read as YAML (1e-3, true, resnet18)."""
    if not flags:
        return config
    parameters = {}
    for flag in flags:
        path, sep, values = flag.partition("=")
        if not sep or not path.strip() or not values.strip():
            raise ConfigError([f"--sweep: expected PATH=V1,V2,... (e.g. "
                               f"training.learning_rate=1e-3,3e-4), got {flag!r}"])
        parameters[path.strip()] = {"values": [yaml.safe_load(v) for v in values.split(",")]}
    data = config.model_dump(mode="json", exclude_none=True)
    sweep = data.get("sweep") or {}
    sweep["parameters"] = {**sweep.get("parameters", {}), **parameters}
    return validate_config({**data, "sweep": sweep})


def check_sweep(config: TrainingConfig) -> TrainingConfig:
    """Every config the sweep can produce validated (sweepspace.check_space) and each distinct
    model name in them checked once (it exists, as `cherry submit` checks one job's), before
    anything is queued. The first trial made's config: pre-flight's checks run on it."""
    configs = sweepspace.check_space(config)
    problems = []
    for one in {c.model.name: c for c in configs}.values():  # one config per model name
        try:
            check_model_name(one)
        except ConfigError as e:
            problems += [f"sweep: {problem}" for problem in e.problems]
    if problems:
        raise ConfigError(problems)
    spec = config.sweep
    first = sweepspace.run_order(spec, config.seed)[0]  # a shortened shuffled grid: not 1
    params = sweepspace.next_point(spec, first, config.seed, []) if spec.method != "tpe" else {
        path: (p.min if p.is_range else p.options[0]) for path, p in spec.parameters.items()}
    return sweepspace.trial_config(config, params, first)


class NoSuchSweep(Exception):
    pass


def find_sweep(sweeps: Sweeps, text: str) -> str:
    """A sweep id from itself, `sweep:<id>`, or its last 4+ characters."""
    wanted = text.removeprefix(PREFIX)
    ids = sweeps.sweep_ids()
    if wanted in ids:
        return wanted
    hits = [s for s in ids if len(wanted) >= 4 and s.endswith(wanted)]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise NoSuchSweep(f"SWEEP: {text!r} matches {len(hits)} sweeps: {', '.join(hits)}")
    raise NoSuchSweep(f"SWEEP: no sweep {text!r} in this root (`cherry status` lists them)")


@dataclass
class Ranked:
    trial: Trial
    value: float | None
    epochs: int


def ranked(sweeps: Sweeps, sweep_id: str) -> list[Ranked]:
    """Every trial, best first by the sweep's metric (trials without a value last)."""
    record = sweeps.record(sweep_id)
    if record is None:
        raise NoSuchSweep(f"SWEEP: {sweep_id} has no readable sweep.json")
    spec = record.config.sweep
    rows = [Ranked(t, t.best(spec.maximize), len(t.values))
            for t in sweeps.trials(sweep_id, values=True)]
    sign = -1 if spec.maximize else 1
    return sorted(rows, key=lambda r: (r.value is None, sign * (r.value or 0), r.trial.record.n))


def best_config_yaml(sweeps: Sweeps, sweep_id: str) -> str:
    """The winning trial's config, ready to submit for a full run."""
    rows = [r for r in ranked(sweeps, sweep_id) if r.value is not None]
    if not rows:
        raise NoSuchSweep(f"SWEEP: {sweep_id} has no trial with a finished epoch yet")
    best = rows[0]
    record = sweeps.record(sweep_id)
    config = sweepspace.trial_config(record.config, best.trial.record.params,
                                     best.trial.record.n)
    data = config.model_dump(mode="json", exclude_none=True)
    data["name"] = f"{record.name}-best"
    header = (f"# The best trial of sweep {sweep_id}: trial {best.trial.record.n} "
              f"({best.trial.record.job_id}), {record.config.sweep.metric} {best.value:.4f}\n"
              f"# with {_params(best.trial.record.params)}\n")
    return header + yaml.safe_dump(data, sort_keys=False)


def summary_lines(sweeps: Sweeps, only: set[str] | None = None) -> list[str]:
    """One line per sweep (or per sweep in `only`): its trials by state, the best so far."""
    lines = []
    for sweep_id in sweeps.sweep_ids():
        if only is not None and sweep_id not in only:
            continue
        record = sweeps.record(sweep_id)
        if record is None:
            continue
        spec, rows = record.config.sweep, ranked(sweeps, sweep_id)
        counts: dict[str, int] = {}
        for r in rows:
            counts[r.trial.word] = counts.get(r.trial.word, 0) + 1
        to_make = record.trials - len(rows)
        parts = [f"{n} {s}" for s, n in sorted(counts.items())]
        if to_make > 0 and not sweeps.cancelled(sweep_id):
            parts.append(f"{to_make} to come")
        best = next((r for r in rows if r.value is not None), None)
        line = (f"{sweep_id}  {spec.method}, {record.trials} trials: {', '.join(parts)}")
        if best is not None:
            line += (f"; best {spec.metric} {best.value:.4f} (trial {best.trial.record.n}: "
                     f"{_params(best.trial.record.params)})")
        lines.append(line)
    return lines


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in params.items())
