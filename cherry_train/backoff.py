"""One way to wait and try again, for everything that does: storage calls on a flaky mount,
Drive API requests, data copies, a worker's idle polls, storing a finished job's weights.

Waits double from `first` up to `cap` (plus up to `jitter` seconds at random, so that many
threads or workers do not retry in step); retrying stops `give_up_after` seconds after the first
try, or after `tries` tries, whichever comes first.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
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
                        **({"sleep": sleep} if sleep is not None else {}))
