"""The stop request every step and wait checks (`StopRequest`: a signal, a cancel, the
runtime cap, a takeover), and stopping on signals: Colab stops a runtime by signalling the
whole process group; so do `timeout`, systemd, `docker stop` and Ctrl-C in a terminal. A stop
ends the worker within a bound whatever the queue root does: every wait wakes on it
(backoff.STOPPING), the writes on the way out have a bounded while each, and past the whole
bound the worker cuts itself short as a second signal would."""

from __future__ import annotations

import contextvars
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import structlog

from cherry_train import logs
from cherry_train.backoff import STOPPING, Stopped
from cherry_train.storage import is_outage

log = structlog.get_logger(__name__)

#: Signals that stop the worker. Colab, systemd, `docker stop`, `timeout` and Ctrl-C in a
#: terminal send them to the whole process group: only the worker's main process acts on them
#: (it finishes its step and checkpoints); its loader processes ignore them.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

#: A job in training: the step ends, its checkpoint is written and the job handed back within
#: this while; storage retries give up at its end (the job then resumes from the newest
#: checkpoint that was written, and waits out its lease if the hand-back was lost).
HAND_BACK_SECONDS = 120.0
#: Then the worker's last status ("stopped") gets this while.
FINAL_STATUS_SECONDS = 30.0
#: Past both, with this margin, a worker still stuck (a request that never answers) stops as
#: on a second signal: at once, exit code 130.
CUT_SHORT_MARGIN_SECONDS = 5.0
#: And if even that does not end it, the process exits without unwinding.
EXIT_ANYWAY_SECONDS = 10.0
EXIT_CUT_SHORT = 130  # as Ctrl-C twice


class StopRequest:
    """Why training must stop, checked at every step. Set from a signal handler (the worker
    stops), the heartbeat thread on a cancel request or when fenced (only the job stops)."""

    JOB_ONLY = ("fenced", "cancel")

    def __init__(self):
        self._event = threading.Event()
        self._reasons: list[str] = []

    @property
    def reason(self) -> str | None:
        # Fenced wins: then nothing more may be written, not even a checkpoint.
        for r in self.JOB_ONLY:
            if r in self._reasons:
                return r
        return self._reasons[0] if self._reasons else None

    def set(self, reason: str) -> None:
        if reason not in self._reasons:
            self._reasons.append(reason)
        self._event.set()

    def clear_job_reasons(self) -> None:
        """After a job ended: keep only the reasons that stop the worker (signals)."""
        self._reasons = [r for r in self._reasons if r not in self.JOB_ONLY]
        if not self._reasons:
            self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        return self._event.wait(seconds)


class CutShort(KeyboardInterrupt):
    """Raised on the main thread when a stop outlasted its bound: as a second signal."""


def stop_bound(busy: bool) -> float:
    """Seconds from a stop to the worker's exit, at the most."""
    return (HAND_BACK_SECONDS if busy else 0.0) + FINAL_STATUS_SECONDS + \
        CUT_SHORT_MARGIN_SECONDS


class _Stopper:
    """What the signals do: the first asks for a stop, bounded; the second (or the bound
    passed) ends the worker at once."""

    def __init__(self, stop: StopRequest, is_busy: Callable[[], bool]):
        self.stop, self.is_busy = stop, is_busy
        self.read_fd, self.write_fd = os.pipe()
        self.received: list[int] = []
        self.ended = threading.Event()  # the worker is through its way out: nothing to cut
        self.cutting_short = False

    def handler(self, signum, _frame):
        os.write(self.write_fd, bytes([signum]))
        if self.received:
            raise CutShort if self.cutting_short else KeyboardInterrupt  # the second signal
        self.received.append(signum)

    def watch(self) -> None:
        seen = 0
        while data := os.read(self.read_fd, 16):
            for signum in data:
                name, seen = signal.Signals(signum).name, seen + 1
                if seen == 1:
                    self.first(name)
                elif not self.cutting_short:
                    log.warning("second signal: exiting now", signal=name)
        os.close(self.read_fd)

    def first(self, name: str) -> None:
        busy = self.is_busy()
        bound = stop_bound(busy)
        # Storage retries go on while the job is checkpointed and handed back; idle, they
        # give up at once (what they were for is dropped).
        STOPPING.request(grace=HAND_BACK_SECONDS if busy else 0.0)
        log.info("stop requested: " + (
            "checkpointing after the current step, then handing the job back (giving up "
            f"after {HAND_BACK_SECONDS:.0f} s); exiting" if busy else "exiting") +
            f" within {bound:.0f} s at the most", signal=name)
        self.stop.set(name)
        threading.Thread(target=self.cut_short_after, args=(bound,), daemon=True,
                         name="cherry-stop-bound").start()

    def cut_short_after(self, bound: float) -> None:
        if self.ended.wait(bound):
            return
        self.cutting_short = True
        log.error(f"stopping took longer than {bound:.0f} s (the queue root does not answer?): "
                  "exiting now, as on a second signal; what was not written is given up")
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # wakes a hung call
        if not self.ended.wait(EXIT_ANYWAY_SECONDS):
            os._exit(EXIT_CUT_SHORT)


@contextmanager
def stop_on_signals(stop: StopRequest, is_busy: Callable[[], bool]) -> Iterator[None]:
    """SIGTERM/SIGINT/SIGHUP: finish the step, checkpoint, release the job, exit 0, all within
    `stop_bound`; a second one (or that bound passed): exit now (130).

    The handler only writes the signal's number to a pipe. It runs on the main thread
    between any two bytecodes, perhaps inside a log call or an Event's lock: logging or
    setting the stop flag there can deadlock (seen: a worker hung for good on a SIGTERM that
    came during a log line). A thread reads the pipe and does both."""
    stopper = _Stopper(stop, is_busy)
    try:
        previous = {s: signal.signal(s, stopper.handler) for s in STOP_SIGNALS}
    except ValueError:  # not the main thread (a notebook thread): no handlers to install
        previous = {}
    watcher = threading.Thread(target=stopper.watch, name="cherry-signals", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stopper.ended.set()
        for s, h in previous.items():
            signal.signal(s, h)
        os.close(stopper.write_fd)  # the watcher reads what is left, then ends
        watcher.join(timeout=5)
        STOPPING.reset()  # a notebook kernel lives on: its next storage calls wait as usual


def within(seconds: float, fn: Callable[[], None]) -> bool:
    """fn() on a thread, waited for `seconds` at the most: True if it ended in time (its error,
    if it failed). Its storage retries may go on that long after a stop, then give up; a
    request that never answers is left behind on its (daemon) thread."""
    context = contextvars.copy_context()  # the log fields bound here
    errors: list[BaseException] = []

    def run() -> None:
        try:
            context.run(fn)
        except BaseException as e:
            errors.append(e)

    with STOPPING.allow(seconds):
        thread = threading.Thread(target=run, name="cherry-bounded", daemon=True)
        thread.start()
        thread.join(seconds)
    if thread.is_alive():
        return False
    if errors:
        raise errors[0]
    return True


def write_on_the_way_out(what: str, write: Callable[[], None],
                         seconds: float = FINAL_STATUS_SECONDS) -> None:
    """write() within `seconds` (retries included), then the worker goes on out anyway: an
    outage must not hide why the loop ended, nor hold the exit up."""
    if STOPPING.is_set():
        log.info(f"stopping: writing {what} (giving up after {seconds:.0f} s)")
    try:
        if within(seconds, write):
            return
        error = "no answer"
    except Exception as e:
        if not is_outage(e) and not isinstance(e, Stopped):
            raise
        error = logs.brief(e)
    log.warning(f"gave up on {what} after {seconds:.0f} s at the most: the queue root did not "
                "take it", error=error)
