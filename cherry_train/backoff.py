"""One way to wait and try again, for everything that does: storage calls on a flaky mount,
Drive API requests, data copies, a worker's idle polls, storing a finished job's weights.

Waits double from `first` up to `cap` (plus up to `jitter` seconds at random, so that many
threads or workers do not retry in step); retrying stops `give_up_after` seconds after the first
try, or after `tries` tries, whichever comes first.

Every wait here wakes on `STOPPING`, the process's stop (a signal to the worker): a retry loop
then gives up with `Stopped` at once, or, inside a bounded while that the stop allows (a
checkpoint, the worker's final status), at the end of that while.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import structlog
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    stop_never,
    wait_exponential,
    wait_random,
)

log = structlog.get_logger(__name__)


class Stopped(RuntimeError):
    """A wait cut short because the process is stopping: what waited is given up. Not an
    OSError, so no retry loop takes it for a storage error to try again."""


class Stopping:
    """The process's stop, which every wait of this module wakes on. Once `request`ed, a wait
    raises Stopped at once, except during a bounded while the stop allows (`request(grace)`,
    `allow(seconds)`): then waits go on, but none past its end."""

    def __init__(self):
        self._changed = threading.Condition()
        self._requested = False
        self._until = 0.0  # time.monotonic() until which waits may go on once stopping

    def is_set(self) -> bool:
        return self._requested

    def request(self, grace: float = 0.0) -> None:
        with self._changed:
            self._requested = True
            self._until = time.monotonic() + grace
            self._changed.notify_all()

    @contextmanager
    def allow(self, seconds: float) -> Iterator[None]:
        """Waits may go on for `seconds` more (the writes on the way out), then give up."""
        with self._changed:
            self._until = time.monotonic() + seconds
            self._changed.notify_all()
        try:
            yield
        finally:
            with self._changed:
                self._until = 0.0
                self._changed.notify_all()

    def reset(self) -> None:
        """Not stopping (again): the worker returned, in a notebook kernel that lives on."""
        with self._changed:
            self._requested, self._until = False, 0.0
            self._changed.notify_all()

    def sleep(self, seconds: float) -> None:
        """Sleep `seconds`; raise Stopped as soon as the stop (or its bounded while) says so."""
        end = time.monotonic() + seconds
        with self._changed:
            while True:
                now = time.monotonic()
                if self._requested and now >= self._until:
                    raise Stopped("the worker is stopping: a wait was cut short")
                if now >= end:
                    return
                self._changed.wait((min(end, self._until) if self._requested else end) - now)


#: The process's one stop: set by the worker's signal handling (worker/signals.py).
STOPPING = Stopping()


@dataclass(frozen=True)
class Backoff:
    first: float = 0.5
    cap: float = 30.0
    give_up_after: float | None = 300.0
    tries: int | None = None
    jitter: float = 0.0

    def waits(self, monotonic: Callable[[], float] = time.monotonic) -> Iterator[float]:
        """The waits between tries, for loops that wait in their own way (on a stop flag, a
        clock that tests drive); it ends where the next wait would pass the give-up time,
        counted from this call (the first try)."""
        deadline = None if self.give_up_after is None else monotonic() + self.give_up_after

        def waits() -> Iterator[float]:
            wait, tries = self.first, 1
            while (deadline is None or monotonic() + wait <= deadline) and \
                    (self.tries is None or tries < self.tries):
                yield wait
                wait, tries = min(2 * wait, self.cap), tries + 1

        return waits()

    def retrying(self, retry_on: Callable[[BaseException], bool], *, event: str,
                 describe: Callable[[BaseException | None], str] = str,
                 sleep: Callable[[float], None] | None = None) -> Retrying:
        """A tenacity Retrying for calls whose errors `retry_on` accepts; each retry is logged
        as `event` with the error (`describe`d), the try and the wait. Use a .copy() per call
        where threads share it."""
        stop = stop_never if self.give_up_after is None else stop_after_delay(self.give_up_after)
        if self.tries is not None:
            stop = stop | stop_after_attempt(self.tries)

        def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else None
            log.warning(event, error=describe(error), attempt=state.attempt_number,
                        wait_seconds=round(wait, 2) if wait is not None else None)

        wait = wait_exponential(multiplier=self.first, max=self.cap)
        if self.jitter:
            wait = wait + wait_random(0, self.jitter)
        return Retrying(retry=retry_if_exception(retry_on), wait=wait, stop=stop,
                        before_sleep=before_sleep, reraise=True,
                        sleep=sleep if sleep is not None else STOPPING.sleep)
