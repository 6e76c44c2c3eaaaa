"""The `cherry` command. Client commands run without torch; the worker is imported lazily.

Exit codes: 0 done, 2 the user's input is wrong (a `field: problem` line each on stderr, no
traceback), 1 anything else (a bug: the traceback is shown).
"""

from __future__ import annotations

import sys

from cherry_train.cli.common import UsageError, err
from cherry_train.cli.parser import build_parser
from cherry_train.client.jobs import NoSuchJob
from cherry_train.client.sweeps import NoSuchSweep
from cherry_train.jobqueue.lifecycle import NotRetryable, WorkerIdInUse
from cherry_train.schemas import ConfigError
from cherry_train.storage.gdrive_api import DriveAuthError, DriveError

__all__ = ["build_parser", "main", "submit_main", "worker_main"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
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


def submit_main() -> int:
    return main(["submit", *sys.argv[1:]])


def worker_main() -> int:
    return main(["worker", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
