"""Race tests: run a function on several threads released at the same moment."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def at_once(n: int, race: Callable[[int, Any], None],
            prepare: Callable[[int], Any] = lambda i: None) -> None:
    """On n threads: prepare(i) (not part of the race), wait for all, then race(i, prepared)."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            prepared = prepare(i)
            barrier.wait()
            race(i, prepared)
        except BaseException as e:  # re-raised in the test's thread
            barrier.abort()
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
