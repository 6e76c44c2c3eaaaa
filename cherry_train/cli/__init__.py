"""The `cherry` command. Client commands run without torch; the worker is imported lazily.

Exit codes: 0 done, 2 the user's input is wrong (a `field: problem` line each on stderr, no
traceback), 1 anything else (a bug: the traceback is shown), 141 the reader of its output left
(`cherry status | head -3`: quietly, as any command piped into head).
"""

from __future__ import annotations

import os
import select
import sys

from cherry_train.cli.common import UsageError, err
from cherry_train.cli.parser import build_parser
from cherry_train.client.jobs import NoSuchJob
from cherry_train.client.sweeps import NoSuchSweep
from cherry_train.jobqueue.lifecycle import NotRetryable, WorkerIdInUse
from cherry_train.schemas import ConfigError
from cherry_train.storage.gdrive_api import DriveAuthError, DriveError

__all__ = ["build_parser", "main", "submit_main", "worker_main"]


#: A command whose reader went away (`cherry status | head -3`): what a shell reports for a
#: process that SIGPIPE ended (128 + 13), as for `yes | head`.
EXIT_PIPE_CLOSED = 141


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, so that a closed pipe is met inside this try
        return code
    except BrokenPipeError:
        if not _reader_gone():
            raise  # a broken connection elsewhere is a bug to see, not a reader that left
        # Python's recipe (the signal module's docs, "Note on SIGPIPE"): what is still buffered
        # goes to devnull, or the interpreter's own flush at exit prints a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE_CLOSED
    except ConfigError as e:
        err(*e.problems)
        return 2
    except (UsageError, WorkerIdInUse, NoSuchJob, NoSuchSweep, NotRetryable,
            DriveAuthError) as e:
        err(f"error: {e}")
        return 2
    except DriveError as e:  # Drive stayed unreachable through all retries: not a bug
        err(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        return 130


def _reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end is closed: poll says so as an error (Linux)
    or a hang-up (macOS) on the writing end. Without poll (Windows), as Python's recipe does."""
    if not hasattr(select, "poll"):
        return True
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError):  # no real stdout (captured): the pipe was not ours
        return False


def submit_main() -> int:
    return main(["submit", *sys.argv[1:]])


def worker_main() -> int:
    return main(["worker", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
