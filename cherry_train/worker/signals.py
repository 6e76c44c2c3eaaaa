"""Stopping on signals: Colab stops a runtime by signalling the whole process group."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import structlog

from cherry_train.worker.reporting import StopRequest
from cherry_train.worker.runtime import STOP_SIGNALS

log = structlog.get_logger(__name__)


@contextmanager
def stop_on_signals(stop: StopRequest, is_busy: Callable[[], bool]) -> Iterator[None]:
    """SIGTERM/SIGINT/SIGHUP: finish the step, checkpoint, release the job, exit 0; a second
    one: exit now.

    The handler only writes the signal's number to a pipe. It runs on the main thread
    between any two bytecodes, perhaps inside a log call or an Event's lock: logging or
    setting the stop flag there can deadlock (seen: a worker hung for good on a SIGTERM that
    came during a log line). A thread reads the pipe and does both."""
    read_fd, write_fd = os.pipe()
    received: list[int] = []

    def handler(signum, _frame):
        os.write(write_fd, bytes([signum]))
        if received:
            raise KeyboardInterrupt  # the second signal
        received.append(signum)

    def watch():
        seen = 0
        while data := os.read(read_fd, 16):
            for signum in data:
                name, seen = signal.Signals(signum).name, seen + 1
                if seen > 1:
                    log.warning("second signal: exiting now", signal=name)
                    continue
                busy = is_busy()
                log.info("stop requested: " + ("checkpointing after the current step, then "
                         "handing the job back" if busy else "exiting"), signal=name)
                stop.set(name)
        os.close(read_fd)

    try:
        previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    except ValueError:  # not the main thread (a notebook thread): no handlers to install
        previous = {}
    watcher = threading.Thread(target=watch, name="cherry-signals", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        os.close(write_fd)  # the watcher reads what is left, then ends
        watcher.join(timeout=5)
