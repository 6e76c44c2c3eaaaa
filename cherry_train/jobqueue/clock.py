"""Time, passed in: heartbeats, leases and expiry ask a clock, so tests can drive it."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def wait(self, stop, seconds: float) -> bool:
        """Sleep until `stop` is set or the time is up; True if stopped."""
        return stop.wait(seconds)


class FakeClock:
    """A clock that only moves when told to (or when something sleeps on it)."""

    def __init__(self, start: datetime | None = None):
        self._now = start or datetime(2026, 11, 26, 10, 0, 0, tzinfo=timezone.utc)

    def now(self) -> datetime:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)

    def wait(self, stop, seconds: float) -> bool:
        if not stop.is_set():
            self.advance(seconds)
        return stop.is_set()


def age_seconds(clock, then: datetime) -> float:
    return (clock.now() - then).total_seconds()
