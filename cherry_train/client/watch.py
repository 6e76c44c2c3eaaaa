"""`cherry watch JOB`: follow one job live until it ends (a progress bar, epochs as they come)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from cherry_train.client.status import storage_warning
from cherry_train.jobqueue.layout import JobPaths
from cherry_train.jobqueue.protocol import JobQueue
from cherry_train.schemas import JobState

#: Exit codes of `cherry watch`: the job's outcome (2 stays "your input is wrong").
EXIT_CODES = {JobState.succeeded: 0, JobState.failed: 1, JobState.cancelled: 3}


def epoch_line(record: dict, epochs: int | None) -> str:
    of = f"/{epochs}" if epochs else ""
    return (f"epoch {record['epoch']}{of}: train loss {record['train_loss']:.4f} "
            f"acc {record['train_accuracy']:.3f} | val loss {record['val_loss']:.4f} "
            f"acc {record['val_accuracy']:.3f}")


def watch(queue: JobQueue, job_id: str, say: Callable[[str], None] = print,
          poll_seconds: float = 5.0, progress: bool = True, sleep=time.sleep) -> JobState:
    """Print each epoch as it is logged and show progress, until the job has a result."""
    paths = JobPaths(job_id)
    shown_epochs, bar, last_attempt, stalled_said, error_said = 0, None, None, False, None
    released_said = None  # the attempt whose hand-back was said
    try:
        while True:
            view = queue.view(job_id)
            epochs = view.manifest.config.epochs if view.manifest else None
            raw = queue.storage.read_text_or_none(paths.metrics) or ""
            records = [json.loads(x) for x in raw.splitlines() if x.strip()]
            epoch_records = [r for r in records if r.get("kind") == "epoch"]
            for record in epoch_records[shown_epochs:]:
                _write(bar, say, epoch_line(record, epochs))
            shown_epochs = max(shown_epochs, len(epoch_records))
            if view.state.finished:
                break
            hb = view.heartbeat
            if view.attempt is not None and view.attempt.n != last_attempt:
                last_attempt = view.attempt.n
                _write(bar, say, f"attempt {view.attempt.n} on {view.attempt.worker_id} "
                                 f"({view.attempt.reason.value})")
            if view.stalled and not stalled_said:
                _write(bar, say, f"no heartbeat for {view.heartbeat_age:.0f} s: the worker is "
                                 "probably gone; the next worker start resumes the job")
            stalled_said = view.stalled
            if hb is not None and hb.released:
                if released_said != hb.attempt:  # nobody trains it now: say so, once
                    released_said = hb.attempt
                    _write(bar, say, released_line(hb))
                sleep(poll_seconds)  # and no progress bar: its ETA would only climb
                continue
            error = hb.storage_error if hb is not None else None
            if error and error != error_said:
                _write(bar, say, storage_warning(error, hb.last_checkpoint_step))
            error_said = error
            if hb is not None and hb.steps_per_epoch and progress:
                bar = _update_bar(bar, hb, job_id)
            sleep(poll_seconds)
    finally:
        if bar is not None:
            bar.close()
    result = view.result
    summary = f"{job_id}: {view.state.value}"
    if result is not None and result.best is not None:
        summary += (f", best val accuracy {result.best.val_accuracy:.3f} "
                    f"(epoch {result.best.epoch})")
    if view.error:
        summary += f": {view.error.splitlines()[0]}"
    say(summary)
    return view.state


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
