"""`cherry submit` of a sweep, `cherry cancel sweep:ID`, `cherry compare sweep:ID` and
`cherry sweep best ID`: the sweep side of the commands."""

from __future__ import annotations

import json
import sys

from cherry_train.cli.common import err, picture_out
from cherry_train.client.sweeps import PREFIX, best_config_yaml, find_sweep, ranked
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.jobqueue.sweeps import Sweeps
from cherry_train.schemas import JobState, TrainingConfig


def is_sweep(queue: JobQueue, text: str) -> bool:
    """Whether a JOB argument names a sweep (`sweep:<id>`, or an id that is a sweep's)."""
    return text.startswith(PREFIX) or text.startswith("sweep-") and \
        text in Sweeps(queue).sweep_ids()


def submit_sweep(queue: JobQueue, config: TrainingConfig, config_file: str,
                 submitted_by: str, version: str) -> None:
    record, manifests = Sweeps(queue).submit(config, config_file=config_file,
                                             submitted_by=submitted_by, client_version=version)
    spec = config.sweep
    stop = (f", early stop: {spec.early_stop.method}" if spec.early_stop else "")
    print(f"sweep: {record.name}, {spec.method}, {record.trials} trials, {spec.parallel} at "
          f"once, {spec.metric}{stop}")
    for m in manifests:
        print(f"queued trial {m.sweep.trial}: {m.job_id}  "
              + ", ".join(f"{k}={v}" for k, v in m.sweep.params.items()))
    if record.trials > len(manifests):
        print(f"(the other {record.trials - len(manifests)} are created by the workers as "
              "trials end)")
    if spec.method == "grid" and spec.early_stop:
        print("(trial n is the n-th combination as the values are written; they run in a "
              "seeded shuffle, so that early stopping compares a fair sample)")
    print(record.sweep_id)


def cancel_sweep(queue: JobQueue, text: str, requested_by: str) -> int:
    sweeps = Sweeps(queue)
    sweep_id = find_sweep(sweeps, text)
    asked = sweeps.cancel(sweep_id, requested_by)
    print(f"cancelled sweep {sweep_id}: no new trials; {len(asked)} trial(s) asked to stop")
    for job_id in asked:
        print(f"  {job_id}")
    return 0


def compare_sweep(queue: JobQueue, text: str, out: str | None, as_json: bool) -> int:
    """The trials ranked by the sweep's metric, and each hyperparameter against it."""
    from cherry_train.client.compare import comparison, render

    sweeps = Sweeps(queue)
    sweep_id = find_sweep(sweeps, text)
    record = sweeps.record(sweep_id)
    rows = ranked(sweeps, sweep_id)
    differing, table = comparison(queue, [r.trial.record.job_id for r in rows])
    metric = record.config.sweep.metric
    # What the trials are ranked by, each trial's best epoch so far: for val_accuracy that is
    # best_val_accuracy (filled in for trials still running); for val_loss the lowest of any
    # epoch, not best_val_loss (the loss at the epoch of best accuracy).
    column = "best_val_accuracy" if metric == "val_accuracy" else "lowest_val_loss"
    for rank, (r, row) in enumerate(zip(rows, table, strict=True), start=1):
        row.update(rank=rank, trial=r.trial.record.n, **{column: r.value})
        if r.trial.paused:
            row["state"] = r.trial.word
    if as_json:
        print(json.dumps({"sweep_id": sweep_id, "metric": metric, "differing": differing,
                          "trials": table}, indent=2))
    else:
        print(f"sweep {sweep_id}: trials by {metric}, best first")
        print(render(differing, table, first=["rank", "trial"],
                     extra=[] if column == "best_val_accuracy" else [column]))
    points = [(r.trial.record.params, r.value, r.trial.state == JobState.pruned)
              for r in rows if r.value is not None]
    try:
        from cherry_train.plots import render_sweep
    except ImportError:
        err("note: no matplotlib here, so no plot (pip install matplotlib)")
        return 0
    path, replaced = picture_out(out)
    path.write_bytes(render_sweep(points, metric, f"{record.name}: {len(points)} trials"))
    print(f"hyperparameters against {metric}: {path.resolve()}{replaced}",
          file=sys.stderr if as_json else sys.stdout)  # with --json, stdout is the JSON
    return 0


def cmd_sweep_best(args) -> int:
    from cherry_train.cli.common import require_root, root_and_queue

    resolved, queue = root_and_queue(args)
    require_root(resolved, queue)
    sweeps = Sweeps(queue)
    print(best_config_yaml(sweeps, find_sweep(sweeps, args.sweep)), end="")
    return 0
