"""`cherry watch JOB`: follow one job live until it ends (a progress bar, epochs as they come)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cherry_train.client.status import failure_advice, storage_warning
from cherry_train.jobqueue.layout import JobPaths
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.jobqueue.views import JobView, job_view
from cherry_train.schemas import JobState

#: Exit codes of `cherry watch`, one per finished state (a test checks every member of
#: JobState; 2 stays "your input is wrong"). Pruned is not an error, yet not 0: the trial was
#: stopped early by its sweep's rule, so a script that goes on to use the model can tell.
EXIT_CODES = {JobState.succeeded: 0, JobState.failed: 1, JobState.cancelled: 3,
              JobState.pruned: 4}


def epoch_line(record: dict, epochs: int | None) -> str:
    of = f"/{epochs}" if epochs else ""
    return (f"epoch {record['epoch']}{of}: train loss {record['train_loss']:.4f} "
            f"acc {record['train_accuracy']:.3f} | val loss {record['val_loss']:.4f} "
            f"acc {record['val_accuracy']:.3f}")


@dataclass
class _Said:
    """What `watch` has told already, so that each piece of news is told once."""

    epochs: int = 0
    attempt: int | None = None
    stalled: bool = False
    storage_error: str | None = None
    released: int | None = None  # the attempt whose hand-back was told
    bar: Any = None


def watch(queue: JobQueue, job_id: str, say: Callable[[str], None] = print,
          poll_seconds: float = 5.0, progress: bool = True, sleep=time.sleep) -> JobState:
    """Print each epoch as it is logged and show progress, until the job has a result."""
    said = _Said()
    try:
        while True:
            view = job_view(queue, job_id)
            _tell_epochs(queue, view, said, say)
            if view.state.finished:
                break
            _tell_news(view, said, say, progress)
            sleep(poll_seconds)
    finally:
        if said.bar is not None:
            said.bar.close()
    result = view.result
    summary = f"{job_id}: {view.state.value}"
    if result is not None and result.best is not None:
        summary += (f", best val accuracy {result.best.val_accuracy:.3f} "
                    f"(epoch {result.best.epoch})")
    if view.error:
        summary += f": {view.error.splitlines()[0]}"
    if view.state == JobState.failed:
        summary += f" ({failure_advice(job_id, view.error_type, view.error)})"
    say(summary)
    return view.state


def _tell_epochs(queue: JobQueue, view: JobView, said: _Said, say) -> None:
    epochs = view.manifest.config.epochs if view.manifest else None
    raw = queue.storage.read_text_or_none(JobPaths(view.job_id).metrics) or ""
    records = [json.loads(x) for x in raw.splitlines() if x.strip()]
    epoch_records = [r for r in records if r.get("kind") == "epoch"]
    for record in epoch_records[said.epochs:]:
        _write(said.bar, say, epoch_line(record, epochs))
    said.epochs = max(said.epochs, len(epoch_records))


def _tell_news(view: JobView, said: _Said, say, progress: bool) -> None:
    """A new attempt, a stall, a hand-back, a storage problem; then the progress bar."""
    hb = view.heartbeat
    if view.attempt is not None and view.attempt.n != said.attempt:
        said.attempt = view.attempt.n
        _write(said.bar, say, f"attempt {view.attempt.n} on {view.attempt.worker_id} "
                              f"({view.attempt.reason.value})")
    if view.stalled and not said.stalled:
        _write(said.bar, say, f"no heartbeat for {view.heartbeat_age:.0f} s: the worker is "
                              "probably gone; the next worker start resumes the job")
    said.stalled = view.stalled
    if hb is not None and hb.released:
        if said.released != hb.attempt:  # nobody trains it now: say so, once
            said.released = hb.attempt
            _write(said.bar, say, released_line(hb))
        return  # and no progress bar: its ETA would only climb
    error = hb.storage_error if hb is not None else None
    if error and error != said.storage_error:
        _write(said.bar, say, storage_warning(error, hb.last_checkpoint_step))
    said.storage_error = error
    if hb is not None and hb.steps_per_epoch and progress:
        said.bar = _update_bar(said.bar, hb, view.job_id)


def released_line(hb) -> str:
    """What a handed-back job waits for, in a sentence."""
    why = f"after an error ({hb.error.type}: {hb.error.message.splitlines()[0]})" \
        if hb.error else "(its worker was stopped)"
    resume = f"step {hb.last_checkpoint_step}" if hb.last_checkpoint_step else "the start"
    return (f"handed back at step {hb.step} {why}; waiting for a worker to resume it from "
            f"{resume} (start one: the Colab notebook, or `cherry worker`)")


def _write(bar, say, text: str) -> None:
    if bar is not None:
        bar.write(text)
    else:
        say(text)


def _update_bar(bar, hb, job_id: str):
    from tqdm.auto import tqdm

    total = hb.epochs * hb.steps_per_epoch
    if bar is None:  # from the step it is at: counted from 0, the first rate was absurd
        bar = tqdm(total=total, initial=min(hb.step, total), desc=f"job {job_id[-4:]}",
                   unit="step", dynamic_ncols=True)
    bar.total = total
    bar.n = min(hb.step, total)
    postfix = {"epoch": f"{hb.epoch}/{hb.epochs}", "phase": hb.phase}
    if hb.loss is not None:
        postfix["loss"] = f"{hb.loss:.4f}"
    if hb.images_per_second:
        postfix["img/s"] = f"{hb.images_per_second:.0f}"
    bar.set_postfix(postfix, refresh=False)
    bar.refresh()
    return bar
