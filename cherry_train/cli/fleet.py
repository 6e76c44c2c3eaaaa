"""`cherry drain`: steering the workers of a root from anywhere (a laptop, the notebook)."""

from __future__ import annotations

import getpass
import socket

from cherry_train.cli.common import UsageError, require_root, root_and_queue
from cherry_train.jobqueue.clock import age_seconds
from cherry_train.jobqueue.workercontrol import UnknownWorker, request_drain
from cherry_train.schemas import WorkerState


def cmd_drain(args) -> int:
    resolved, queue = root_and_queue(args)
    require_root(resolved, queue)
    worker_id = args.worker_id
    status = queue.worker_status(worker_id)
    if status is not None and status.state == WorkerState.stopped:
        # A request now would drain its next start at once: say so rather than leave one.
        print(f"{worker_id} has stopped already ({age_seconds(queue.clock, status.at):.0f} s "
              "ago); nothing to drain")
        return 0
    try:
        first = request_drain(queue, worker_id, f"{getpass.getuser()}@{socket.gethostname()}")
    except UnknownWorker as e:
        raise UsageError(str(e)) from None
    again = "" if first else " (it had been requested already)"
    job = f" ({status.job_id})" if status is not None and status.job_id else ""
    print(f"drain requested for {worker_id}{again}: it finishes the job it trains{job}, takes no "
          "new one and exits; it notices at its next poll or heartbeat. `cherry status` shows it "
          "draining, then stopped")
    return 0
