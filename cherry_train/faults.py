"""A fault hook for crash tests: the process kills itself (SIGKILL) at a named point.

    CHERRY_FAULT=checkpoint-write@2      the 2nd time this process reaches that point
    CHERRY_FAULT=step@5,before-commit    several points; @1 when no count is given
    CHERRY_FAULT=follower-setup:raise    raise InjectedFault there instead of dying

Random kills from outside rarely land inside a write that takes milliseconds; this does.
Points: after-claim, step, checkpoint-write (leaves a half-written temp file),
checkpoint-before-checksum, before-commit, after-commit, follower-setup (a multi-GPU job's
rank > 0).

    CHERRY_SLOW=decode:0.03              every image decode takes 30 ms longer (an input-bound
                                         job, as on a 2-core Colab VM, on a fast test machine)
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable

_reached: Counter[str] = Counter()


class InjectedFault(RuntimeError):
    pass


def point(name: str, before_kill: Callable[[], None] | None = None) -> None:
    spec = os.environ.get("CHERRY_FAULT")
    if not spec:
        return
    _reached[name] += 1
    for item in spec.split(","):
        where, _, action = item.strip().partition(":")
        target, _, count = where.partition("@")
        if target == name and _reached[name] == int(count or 1):
            if action == "raise":
                raise InjectedFault(f"a fault injected at {name} (CHERRY_FAULT)")
            if before_kill is not None:
                before_kill()
            os.kill(os.getpid(), signal.SIGKILL)


def slow(name: str) -> None:
    """Sleep as $CHERRY_SLOW says for this point (read at every call: loader processes have
    the environment of the worker that started them)."""
    spec = os.environ.get("CHERRY_SLOW")
    if not spec:
        return
    for item in spec.split(","):
        target, _, seconds = item.strip().partition(":")
        if target == name and float(seconds) > 0:
            # Not sleep(0): a syscall and a GIL hand-off per call, 60,000 of them in a listing
            # cost seconds and made the listing look slow enough to take its threaded path.
            time.sleep(float(seconds))
