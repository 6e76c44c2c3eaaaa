"""`cherry worker`: the worker loop on a queue root, from the command line (the Colab notebook
runs the same). Torch is imported here, not by the client commands."""

from __future__ import annotations

import os

from cherry_train.cli.common import UsageError, require_root, root_and_queue
from cherry_train.jobqueue.claims import WorkerIdentity, default_worker_id
from cherry_train.jobqueue.ids import WORKER_ID_RE
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.places import on_skypilot, resolve_root


def cmd_worker(args) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UsageError("the worker needs torch: pip install 'cherry-train[worker]'") from None
    from cherry_train import logs
    from cherry_train.worker.checkpoints.kernelseal import KernelKeyError, load_seal
    from cherry_train.worker.loop import Worker, WorkerOptions
    from cherry_train.worker.scratch import UnsafeScratch

    logs.configure(args.log_format, args.log_level)
    if args.threads:
        torch.set_num_threads(args.threads)
    if on_skypilot() and resolve_root(args.root).is_fallback:
        # The local default root would be a folder on a VM that goes away, fed by nobody.
        raise UsageError("no queue root on this SkyPilot VM: pass --root or set $CHERRY_ROOT "
                         "(e.g. --env CHERRY_ROOT=gdrive:traina at launch)")
    resolved, queue = root_and_queue(args)
    if args.confirm_uploads:
        queue = JobQueue(_confirmed_mount(resolved.root))
    require_root(resolved, queue)
    worker_id = args.worker_id or os.environ.get("CHERRY_WORKER_ID") or default_worker_id()
    if not WORKER_ID_RE.fullmatch(worker_id):  # $ alone lets a final newline in
        raise UsageError(f"--worker-id: {worker_id!r} is not allowed; use letters, digits, "
                         "'.', '_' and '-' (at most 64)")
    try:
        seal = load_seal(args.kernel_key_file, queue.storage.local_path(""))
    except KernelKeyError as e:
        raise UsageError(str(e)) from None
    from cherry_train.worker.colabsession import default_max_runtime_hours
    from cherry_train.worker.training.device import capabilities

    webhook = _webhook(args.webhook or os.environ.get("CHERRY_WEBHOOK") or None)
    max_runtime = args.max_runtime if args.max_runtime is not None else \
        default_max_runtime_hours()
    options = WorkerOptions(exit_when_idle=args.exit_when_idle, progress_bar=args.progress,
                            poll_max_seconds=args.poll_seconds,
                            idle_shutdown_minutes=args.idle_shutdown,
                            max_runtime_hours=max_runtime, gpus=args.gpus,
                            kernel_seal=seal, webhook=webhook,
                            capabilities=capabilities(args.gpus))
    try:
        return Worker(queue, WorkerIdentity(worker_id), options).run()
    except UnsafeScratch as e:
        raise UsageError(str(e)) from None


def _webhook(url: str | None) -> str | None:
    """--webhook checked once at the start: a typo or a host this machine cannot reach is
    said now, not found out after the first job's hours (the URL is never printed: it holds
    the webhook's secret)."""
    if url is None:
        return None
    from cherry_train.schemas.config import check_webhook
    from cherry_train.worker.reporting.notify import reachable

    try:
        url = check_webhook(url)
    except ValueError as e:
        raise UsageError(f"--webhook (or $CHERRY_WEBHOOK): {e}") from None
    problem = reachable(url)
    if problem is not None:
        raise UsageError(f"--webhook (or $CHERRY_WEBHOOK): {problem}; check the URL, or start "
                         "the worker without it") from None
    return url


def _confirmed_mount(root: str):
    from cherry_train.storage.confirmed import open_confirmed_mount

    if root.startswith("gdrive:"):
        raise UsageError("--confirm-uploads: an API root is confirmed already; the option is "
                         "for a Drive mount root")
    try:
        return open_confirmed_mount(root)
    except ValueError as e:
        raise UsageError(str(e)) from None
