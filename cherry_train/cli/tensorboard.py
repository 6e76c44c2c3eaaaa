"""`cherry tensorboard`: TensorBoard over a root's jobs, each job a run (its `tensorboard/`)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time

from cherry_train.cli.common import UsageError, require_root, root_and_queue

#: An API root's local copy is brought up to date this often while TensorBoard runs.
RESYNC_SECONDS = 60.0


def cmd_tensorboard(args) -> int:
    from cherry_train.client.boards import logdir

    resolved, queue = root_and_queue(args)
    require_root(resolved, queue)
    folder = logdir(queue)
    if args.logdir_only:
        print(folder)
        return 0
    if importlib.util.find_spec("tensorboard") is None:
        raise UsageError("tensorboard is not installed here: pip install tensorboard (or "
                         f"point your own at --logdir {folder})")
    print(f"TensorBoard over the jobs of {resolved.root}: http://localhost:{args.port}/ "
          "(Ctrl-C ends it)")
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir",
                             str(folder), "--port", str(args.port)])
    try:
        while proc.poll() is None:
            time.sleep(RESYNC_SECONDS if queue.storage.local_path("") is None else 1.0)
            if queue.storage.local_path("") is None and proc.poll() is None:
                logdir(queue)  # new epochs, new jobs
    except KeyboardInterrupt:
        proc.terminate()
    return proc.wait()
