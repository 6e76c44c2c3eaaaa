"""A sweep's search space and its rules, as plain functions of plain data: which values trial n
gets (grid, random, tpe), the config each trial trains with, and when a trial stops early (ASHA,
median). The queue side (jobqueue/sweeps.py) and the worker (worker/training/pruning.py) call
these."""

from __future__ import annotations

import itertools
import math
import random
import statistics
from dataclasses import dataclass
from typing import Any

from cherry_train.schemas import ConfigError, TrainingConfig, validate_config
from cherry_train.schemas.sweep import Parameter, SweepSection


@dataclass(frozen=True)
class Past:
    """One trial so far, as a sampler sees it: its values, and its best metric (None while
    it runs); `state` is "complete", "pruned", "running" or "failed"."""

    params: dict[str, Any]
    value: float | None
    state: str


def total_trials(spec: SweepSection) -> int:
    if spec.method == "grid":
        combinations = len(grid_points(spec))
        return min(spec.trials or combinations, combinations)
    return spec.trials


def grid_points(spec: SweepSection) -> list[dict[str, Any]]:
    """Every combination, in the order the values are written: trial n is the n-th."""
    paths = list(spec.parameters)
    options = [spec.parameters[p].options for p in paths]
    return [dict(zip(paths, combo, strict=True)) for combo in itertools.product(*options)]


def run_order(spec: SweepSection, seed: int = 0) -> list[int]:
    """The numbers of the trials a sweep makes, in the order they are made (so run): 1, 2, ...;
    a grid with early stopping in an order shuffled by the seed. ASHA promotes among the first
    trials to reach a rung before the rest arrive, and in written order those share the first
    value of the first parameter (a sweep's first three trials all at the highest learning
    rate): a fair sample judges better. Only the order is shuffled, never the numbering."""
    if spec.method != "grid":
        return list(range(1, spec.trials + 1))
    numbers = list(range(1, len(grid_points(spec)) + 1))
    if spec.early_stop is not None:
        random.Random(f"cherry-grid-{seed}").shuffle(numbers)
    return numbers[:total_trials(spec)]


def next_trial(spec: SweepSection, seed: int, made: set[int]) -> int | None:
    """The number of the next trial to make, given those made; None when all are made."""
    return next((n for n in run_order(spec, seed) if n not in made), None)


def random_point(spec: SweepSection, seed: int, n: int) -> dict[str, Any]:
    """Trial n's values drawn from the space: the same for every worker that draws them."""
    rng = random.Random(f"cherry-sweep-{seed}-{n}")
    return {path: _draw(p, rng) for path, p in spec.parameters.items()}


def _draw(p: Parameter, rng: random.Random) -> Any:
    if not p.is_range:
        return rng.choice(p.options)
    if p.log:
        value = math.exp(rng.uniform(math.log(p.min), math.log(p.max)))
    else:
        value = rng.uniform(p.min, p.max)
    return round(value) if p.integer else float(f"{value:.6g}")


def next_point(spec: SweepSection, n: int, seed: int, past: list[Past]) -> dict[str, Any]:
    """The values of trial n (1-based). Grid and random depend on n alone; tpe asks Optuna's TPE
    sampler, rebuilt in memory from the trials so far (running ones included, as lies)."""
    if spec.method == "grid":
        return grid_points(spec)[n - 1]
    if spec.method == "random":
        return random_point(spec, seed, n)
    return _tpe_point(spec, n, seed, past)


def _tpe_point(spec: SweepSection, n: int, seed: int, past: list[Past]) -> dict[str, Any]:
    try:
        import optuna
    except ImportError:
        raise ConfigError(["sweep.method: tpe needs Optuna here: pip install "
                           "'cherry-train[sweep]'"]) from None
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {}
    for path, p in spec.parameters.items():
        if not p.is_range:
            space[path] = CategoricalDistribution(p.options)
        elif p.integer:
            space[path] = IntDistribution(int(p.min), int(p.max), log=p.log)
        else:
            space[path] = FloatDistribution(p.min, p.max, log=p.log)
    sampler = optuna.samplers.TPESampler(seed=seed * 100_003 + n, constant_liar=True,
                                         n_startup_trials=min(10, max(2, total_trials(spec) // 4)))
    study = optuna.create_study(direction="maximize" if spec.maximize else "minimize",
                                sampler=sampler)
    for trial in past:
        kind = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED,
                "running": TrialState.RUNNING}.get(trial.state)
        if kind is None or (kind == TrialState.COMPLETE and trial.value is None):
            continue
        try:
            study.add_trial(create_trial(
                params=trial.params, distributions=space, state=kind,
                value=trial.value if kind == TrialState.COMPLETE else None,
                intermediate_values={0: trial.value} if kind == TrialState.PRUNED and
                trial.value is not None else None))
        except ValueError:
            continue  # values from before the space was changed: nothing to learn from
    return study.ask(space).params


def trial_config(base: TrainingConfig, params: dict[str, Any], n: int) -> TrainingConfig:
    """The config trial n trains with: the base with its values put in, named <name>-t<n>,
    without the sweep section. A value the config refuses names the trial and the field."""
    try:
        return _with_values(base, params, n)
    except ConfigError as e:
        raise ConfigError([f"sweep trial {n} ({_shown(params)}): {problem}"
                           for problem in e.problems]) from None


def _with_values(base: TrainingConfig, params: dict[str, Any], n: int) -> TrainingConfig:
    data = base.model_dump(mode="json", exclude={"sweep"})
    for path, value in params.items():
        section, *rest = path.split(".")
        target = data
        for key in [section, *rest][:-1]:
            if not isinstance(target.get(key), dict):
                target[key] = {}
            target = target[key]
        target[path.split(".")[-1]] = value
    data["name"] = f"{base.name or 'sweep'}-t{n}"
    return validate_config(data)


def _shown(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in params.items())


def _points(config: TrainingConfig) -> list[tuple[str, dict[str, Any]]]:
    """What check_space validates, each with how an error names it: every trial a grid or a
    random sweep makes, and (random, tpe) every listed value and both ends of every range, the
    other parameters at their first value: random's draws may miss a value a later edit of
    `trials` would reach, and tpe's are not known before the trials run."""
    spec = config.sweep
    if spec.method == "grid":
        # Every combination, also those a shortened grid (trials < combinations) leaves out:
        # a value that cannot run is a mistake in the sweep whichever trials it falls in.
        return [(f"sweep trial {n} ({_shown(p)})", p)
                for n, p in enumerate(grid_points(spec), start=1)]
    drawn = [] if spec.method == "tpe" else [random_point(spec, config.seed, n)
                                              for n in range(1, spec.trials + 1)]
    points = [(f"sweep trial {n} ({_shown(p)})", p) for n, p in enumerate(drawn, start=1)]
    first = {path: (p.min if p.is_range else p.options[0]) for path, p in spec.parameters.items()}
    for path, p in spec.parameters.items():
        for value in ([p.min, p.max] if p.is_range else p.options):
            value = round(value) if p.is_range and p.integer else value
            points.append((f"sweep value {path}={value!r}", {**first, path: value}))
    return points


def check_space(config: TrainingConfig) -> list[TrainingConfig]:
    """Validate every config a sweep can produce (_points) before anything is queued: a bad one
    raises ConfigError naming the trial or the value, and the field. The configs checked."""
    points, configs = _points(config), []
    found: dict[str, list[str]] = {}  # problem -> the points it is in, named
    for n, (label, params) in enumerate(points, start=1):
        try:
            configs.append(_with_values(config, params, n))
        except ConfigError as e:
            for problem in e.problems:
                found.setdefault(problem, []).append(label)
    if found:  # a problem every point has is said once
        raise ConfigError([f"sweep (every trial): {problem}" if len(labels) == len(points) > 1
                           else f"{labels[0]}: {problem}" for problem, labels in found.items()])
    return configs


# -- early stopping ------------------------------------------------------------------------------

def rungs(grace_epochs: int, reduction: int, epochs: int) -> list[int]:
    """ASHA's rungs: the epochs grace x reduction^k before the last (where nothing is left to
    save)."""
    found, epoch = [], grace_epochs
    while epoch < epochs:
        found.append(epoch)
        epoch *= reduction
    return found


#: What a rung ranks trials by: the metric, or (pruning.py) the metric and a tie-breaker.
Rank = float | tuple[float, ...]


def asha_verdict(own: Rank, others: list[Rank], reduction: int, maximize: bool,
                 complete: bool, promoted: int = 0) -> tuple[str, Rank | None]:
    """ASHA's rule for a trial at a rung (Li et al., 2018). Of the n trials that reached the
    rung (itself included) the top k = floor(n / reduction) may go on: the trial is promoted
    ("go") if it is among them and fewer than k of the others were `promoted` already. Else it
    "pause"s: later trials can only move the cut, so it may be promoted then. Once the rung is
    `complete` (no trial can reach it any more) the cut is final: the top max(1, k) go on, the
    rest are "prune"d. Returns the verdict and the cutoff (None while k is 0)."""
    values = sorted([own, *others], reverse=maximize)
    keep = len(values) // reduction
    if complete:
        keep = max(1, keep)
    if keep == 0:
        return ("pause", None)
    cutoff = values[keep - 1]
    if not ((own >= cutoff) if maximize else (own <= cutoff)):
        return ("prune" if complete else "pause", cutoff)
    if not complete and promoted >= keep:
        return ("pause", cutoff)  # this rung's promotions are spent until more trials arrive
    return ("go", cutoff)


def best_until(values: dict[int, Rank], epoch: int, maximize: bool) -> Rank | None:
    """A trial's best metric up to `epoch` (None if it has not reached it): what a rung
    compares, as Optuna's pruners do, so one noisy epoch does not decide."""
    if epoch not in values:
        return None
    upto = [v for e, v in values.items() if e <= epoch]
    return max(upto) if maximize else min(upto)


def median_stops(own: float, others: list[float], maximize: bool) -> tuple[bool, float]:
    """Whether a trial stops: it is worse than the median of the others at the same epoch."""
    middle = statistics.median(others)
    return (own < middle if maximize else own > middle), middle
