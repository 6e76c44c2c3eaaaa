"""A worker process that leaves a loader-like child behind (one that ignores SIGTERM, as loader
processes do), run by tests/test_crash.py: it must still exit when its loop ends.

    python tests/lingering_loader_worker.py ROOT
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
import time

from cherry_train.jobqueue.claims import WorkerIdentity
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.storage import LocalStorage
from cherry_train.worker.loop import Worker, WorkerOptions


def linger(ready) -> None:
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    ready.set()
    time.sleep(3600)


if __name__ == "__main__":
    context = multiprocessing.get_context("forkserver")
    ready = context.Event()
    child = context.Process(target=linger, args=(ready,), daemon=True)
    child.start()  # an iterator nobody shut down would leave one like it
    assert ready.wait(60), "the lingering child did not start"
    worker = Worker(JobQueue(LocalStorage(sys.argv[1])), WorkerIdentity("w"),
                    WorkerOptions(exit_when_idle=True))
    sys.exit(worker.run())
