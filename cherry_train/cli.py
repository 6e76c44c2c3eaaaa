"""The `cherry` command. Client commands run without torch; the worker is imported lazily.

Exit codes: 0 done, 2 the user's input is wrong (a `field: problem` line each on stderr, no
traceback), 1 anything else (a bug: the traceback is shown).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cherry_train import __version__
from cherry_train.client.jobs import NoSuchJob, find_job, find_jobs
from cherry_train.jobqueue.ids import WORKER_ID_RE
from cherry_train.jobqueue.protocol import JobQueue, NotRetryable, WorkerIdentity, WorkerIdInUse
from cherry_train.jobqueue.roots import (
    ResolvedRoot,
    default_local_root,
    find_my_drive,
    resolve_root,
    save_root,
)
from cherry_train.schemas import ConfigError, config_json_schema
from cherry_train.storage import UnsupportedRoot, open_storage
from cherry_train.storage.gdrive import DriveAuthError, DriveError


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit 2."""


def _err(*lines: str) -> None:
    for line in lines:
        print(line, file=sys.stderr)


def _root(args) -> tuple[ResolvedRoot, JobQueue]:
    resolved = resolve_root(getattr(args, "root", None))
    if resolved.is_fallback:
        _err(f"note: no root configured (--root, $CHERRY_ROOT or `cherry init`); using the local "
             f"folder {resolved.root}")
    try:
        return resolved, JobQueue(open_storage(resolved.root))
    except (UnsupportedRoot, DriveAuthError) as e:
        raise UsageError(str(e)) from None


# -- commands ----------------------------------------------------------------------------------

def cmd_submit(args) -> int:
    from cherry_train.client import submit as client

    config = client.load_config_file(Path(args.config), name=args.name, priority=args.priority)
    resolved, queue = _root(args)
    config = client.resolve_evaluated_job(queue, config)
    if args.no_preflight:
        client.check_model_name(config)  # validation, not pre-flight: always
        report = None
    else:
        report = client.preflight(config, queue.storage.local_path(""), storage=queue.storage)
    manifest = client.submit(queue, config, str(Path(args.config).resolve()))
    print(f"root: {resolved.root} (from {resolved.source})")
    if report is not None:
        print(report.render())
    if not client.live_workers(queue):
        _err("warning: no worker has written a heartbeat to this root in the last "
             f"{client.WORKER_FRESH_SECONDS // 60} minutes; the job waits until one starts "
             "(run the Colab notebook or `cherry worker`)")
    print(f"queued: {manifest.name}, priority {manifest.priority}")
    print(manifest.job_id)
    return 0


def cmd_worker(args) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UsageError("the worker needs torch: pip install 'cherry-train[worker]'") from None
    from cherry_train import logs
    from cherry_train.worker.loop import Worker, WorkerOptions

    logs.configure(args.log_format, args.log_level)
    if args.threads:
        torch.set_num_threads(args.threads)
    resolved, queue = _root(args)
    if args.confirm_uploads:
        queue = JobQueue(_confirmed_mount(resolved.root))
    _require_root(resolved, queue)
    worker_id = args.worker_id or os.environ.get("CHERRY_WORKER_ID") or _default_worker_id()
    if not WORKER_ID_RE.match(worker_id):
        raise UsageError(f"--worker-id: {worker_id!r} is not allowed; use letters, digits, "
                         "'.', '_' and '-' (at most 64)")
    from cherry_train.jobqueue.roots import on_colab
    from cherry_train.worker.runtime import COLAB_PRO_MAX_HOURS

    max_runtime = args.max_runtime
    if max_runtime is None and on_colab():
        max_runtime = COLAB_PRO_MAX_HOURS
    options = WorkerOptions(exit_when_idle=args.exit_when_idle, progress_bar=args.progress,
                            poll_max_seconds=args.poll_seconds,
                            idle_shutdown_minutes=args.idle_shutdown,
                            max_runtime_hours=max_runtime)
    return Worker(queue, WorkerIdentity(worker_id), options).run()


_ROOT_HINT = "with the folder that `cherry submit` uses (it creates the root)"


def _require_root(resolved: ResolvedRoot, queue: JobQueue) -> None:
    """A root that does not exist is a mistyped one (or an unmounted Drive): say so, rather
    than show an empty queue or wait on one. The local default root (no root configured) is
    said to be used already, and is empty until the first submit."""
    local = queue.storage.local_path("")
    if local is None:
        if queue.storage.stat("") is None:
            raise UsageError(f"queue root {resolved.root} does not exist (from {resolved.source}),"
                             f" or this account cannot see it ({queue.storage.description}); "
                             f"pass --root {_ROOT_HINT}")
    elif not local.is_dir() and not resolved.is_fallback:
        mount = " (is Google Drive mounted?)" if "/content/drive" in str(local) else ""
        raise UsageError(f"queue root {local} does not exist (from {resolved.source}){mount}; "
                         f"pass --root {_ROOT_HINT}")


def _confirmed_mount(root: str):
    from cherry_train.storage.confirmed import open_confirmed_mount

    if root.startswith("gdrive:"):
        raise UsageError("--confirm-uploads: an API root is confirmed already; the option is "
                         "for a Drive mount root")
    try:
        return open_confirmed_mount(root)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _default_worker_id() -> str:
    import socket

    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())
    return (host.strip("-._") or "worker")[:64]


def cmd_status(args) -> int:
    from cherry_train.client.status import job_rows, render_table, worker_rows

    resolved, queue = _root(args)
    _require_root(resolved, queue)
    rows = job_rows(queue)
    if args.state:
        rows = [r for r in rows if r["state"] == args.state]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"root: {resolved.root}")
    print(render_table(rows, worker_rows(queue)))
    return 0


def cmd_cancel(args) -> int:
    import getpass
    import socket

    resolved, queue = _root(args)
    _require_root(resolved, queue)
    job_id = find_job(queue, args.job)
    view = queue.view(job_id)
    if view.state.finished:
        print(f"{job_id} already {view.state.value}; nothing to cancel")
        return 0
    first = queue.request_cancel(job_id, f"{getpass.getuser()}@{socket.gethostname()}")
    again = "" if first else " (it had been requested already)"
    if view.state.value == "queued":
        print(f"cancelled {job_id}: it will not start{again}")
    else:
        print(f"cancel requested for {job_id}{again}: its worker checkpoints and stops at its "
              f"next heartbeat (every {view.manifest.config.heartbeat_seconds:g} s)"
              if view.manifest else f"cancel requested for {job_id}{again}")
    return 0


def cmd_retry(args) -> int:
    resolved, queue = _root(args)
    _require_root(resolved, queue)
    job_id = find_job(queue, args.job)
    manifest = queue.retry(job_id)
    step = queue.latest_checkpoint_step(job_id)
    where = f"from its checkpoint at step {step}" if step is not None else "from the start"
    print(f"queued {job_id} again: its next attempt resumes {where}, with the crash-loop count "
          f"started afresh (attempt {(manifest.retried_after_attempt or 0) + 1})")
    return 0


def cmd_watch(args) -> int:
    from cherry_train.client.watch import EXIT_CODES, watch

    resolved, queue = _root(args)
    _require_root(resolved, queue)
    state = watch(queue, find_job(queue, args.job), poll_seconds=args.poll_seconds,
                  progress=not args.no_progress)
    return EXIT_CODES[state]


def cmd_fetch(args) -> int:
    from cherry_train.client.fetch import ChecksumMismatch, fetch

    resolved, queue = _root(args)
    _require_root(resolved, queue)
    job_id = find_job(queue, args.job)
    dest = Path(args.dest) / job_id
    try:
        fetched = fetch(queue, job_id, dest, checkpoints=args.checkpoints)
    except ChecksumMismatch as e:
        _err(f"error: {e}")
        return 1
    for f in fetched:
        print(f"{f.status:>10}  {f.bytes:>12,} B  {f.path}")
    if any(f.status == "unverified" for f in fetched):
        _err("note: the job has no result yet; these files are as they are now, unverified")
    print(dest)
    return 0


def cmd_compare(args) -> int:
    from cherry_train.client.compare import comparison, overlay_png, render

    _, queue = _root(args)
    job_ids = find_jobs(queue, args.jobs)
    if len(job_ids) < 2:
        raise UsageError(f"JOB: compare needs at least two jobs; {args.jobs} matched "
                         f"{len(job_ids)}")
    differing, rows = comparison(queue, job_ids)
    if args.json:
        print(json.dumps({"differing": differing, "jobs": rows}, indent=2))
    else:
        print(render(differing, rows))
    try:
        png = overlay_png(queue, job_ids)
    except ImportError:
        _err("note: no matplotlib here, so no plot (pip install matplotlib)")
        return 0
    Path(args.out).write_bytes(png)
    print(f"curves: {Path(args.out).resolve()}")
    return 0


def cmd_init(args) -> int:
    if args.root:
        root = args.root
    else:
        my_drive = find_my_drive()
        if my_drive is None:
            raise UsageError("no Google Drive for Desktop folder found here; pass the queue "
                             "folder: cherry init PATH (or set CHERRY_MYDRIVE)")
        root = str(my_drive / "traina")
    if not root.startswith("gdrive:"):
        Path(root).expanduser().mkdir(parents=True, exist_ok=True)
        root = str(Path(root).expanduser().resolve())
    path = save_root(root)
    print(f"default root: {root}\n(saved in {path}; --root and $CHERRY_ROOT still win)")
    return 0


def cmd_demo(args) -> int:
    from cherry_train import logs
    from cherry_train.demo.run import DemoSize, run_demo

    logs.configure("console", args.log_level)
    # Never the configured queue root: the demo's job and data stay out of real queues.
    root = Path(args.root) if args.root else default_local_root().parent / "demo"
    if str(root).startswith("gdrive:"):
        raise UsageError("--root: the demo runs on a local folder")
    print(f"demo root: {root}")
    size = DemoSize(train=args.train_images, val=args.val_images, epochs=args.epochs,
                    image_size=args.image_size, model=args.model)
    result = run_demo(root, size, progress_bar=not args.no_progress)
    return 0 if result.state.value == "succeeded" else 1


def cmd_drive_login(args) -> int:
    from cherry_train.storage.gdrive_auth import login

    path = login(Path(args.client_secrets), open_browser=not args.no_browser)
    print(f"Drive access granted; token saved in {path} (readable only by you).\n"
          "Use a Drive folder as the queue root with --root gdrive:<folder>, e.g. "
          "`cherry init gdrive:traina`.")
    return 0


def cmd_data_pack(args) -> int:
    from cherry_train import datapack
    from cherry_train.sizes import human_bytes

    folder = Path(args.path)
    if not folder.is_dir():
        raise UsageError(f"{args.path} is not a folder (give the data folder itself, e.g. "
                         "data/train, whose class folders hold the images)")
    try:
        index, place, built = datapack.pack_folder(folder, args.shard_mb << 20,
                                                   progress=not args.no_progress)
    except datapack.PackError as e:
        raise UsageError(str(e)) from None
    size = human_bytes(index.bytes)
    if not built:
        print(f"{place.description} is current: {len(index.files)} files in "
              f"{len(index.shards)} shards ({size}); nothing to do")
        return 0
    print(f"packed {len(index.files)} files of {folder} into {len(index.shards)} shards "
          f"({size}), checked against the folder: {place.description}\n"
          f"It takes {size} of Drive space beside the folder. Workers copy these shards "
          "instead of each file, and rebuild them when the folder changes (data.pack: off "
          "in a config does without).")
    return 0


def cmd_schema(args) -> int:
    print(config_json_schema())
    return 0


# -- parser ------------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cherry", description="A training-job queue in a Drive "
                                "folder: submit on a laptop, train on Colab.")
    p.add_argument("--version", action="version", version=f"cherry-train {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    root_help = ("queue root: a folder, or gdrive:<folder> for the Drive API (default: "
                 "$CHERRY_ROOT, then `cherry init`'s)")

    s = sub.add_parser("submit", help="validate a config and queue it as a job")
    s.add_argument("config", help="the training config (YAML)")
    s.add_argument("--root", help=root_help)
    s.add_argument("--name", help="experiment name (default: the config's, else its file name)")
    s.add_argument("--priority", type=int, help="higher runs first (default: the config's, 0)")
    s.add_argument("--no-preflight", action="store_true", help="skip the data checks")
    s.set_defaults(func=cmd_submit)

    w = sub.add_parser("worker", help="claim and train jobs until stopped")
    w.add_argument("--root", help=root_help)
    w.add_argument("--worker-id", help="a stable id (e.g. per notebook): a restarted worker with "
                   "the same id takes its own stalled job back at once (default: host name)")
    w.add_argument("--exit-when-idle", action="store_true", help="exit when nothing is claimable")
    w.add_argument("--threads", type=_positive_int, help="torch CPU threads (pin it for "
                   "bit-exact resume on CPU)")
    w.add_argument("--idle-shutdown", type=_positive_float, metavar="MIN",
                   help="after MIN minutes with nothing to do, release the Colab runtime (so "
                   "compute units stop burning) and exit")
    w.add_argument("--max-runtime", type=_positive_float, metavar="HOURS",
                   help="the runtime's session cap: checkpoint and hand the job back before it, "
                   "start no job that cannot reach a checkpoint before it (default on Colab: "
                   "24, Colab Pro; use 12 on Colab Free; elsewhere: none)")
    w.add_argument("--confirm-uploads", action="store_true",
                   help="on a Drive mount root (Colab): count a checkpoint or result as saved "
                   "only once the Drive API shows that Drive has it (the mount uploads later)")
    w.add_argument("--poll-seconds", type=float, default=30.0,
                   help="longest wait between polls of an idle queue (default 30)")
    w.add_argument("--progress", action="store_true", help="show a progress bar per epoch")
    w.add_argument("--log-format", choices=("auto", "json", "console"), default="auto",
                   help="auto (default): readable lines in a terminal, JSON lines when the "
                   "output goes to a pipe or file")
    w.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                   help="the least important log lines shown (default: info; each job's "
                   "worker.log keeps its info lines anyway)")
    w.set_defaults(func=cmd_worker)

    st = sub.add_parser("status", help="show jobs and workers")
    st.add_argument("--root", help=root_help)
    st.add_argument("--json", action="store_true", help="a JSON list of jobs")
    st.add_argument("--state", choices=("queued", "running", "succeeded", "failed", "cancelled"),
                    help="only jobs in this state")
    st.set_defaults(func=cmd_status)

    c = sub.add_parser("cancel", help="cancel a queued or running job")
    c.add_argument("job", metavar="JOB", help="the job id (or 4+ characters of its end, e.g. 7f3a)")
    c.add_argument("--root", help=root_help)
    c.set_defaults(func=cmd_cancel)

    r = sub.add_parser("retry", help="put a failed or cancelled job back in the queue; it "
                       "resumes from its newest checkpoint")
    r.add_argument("job", metavar="JOB", help="the job id (or 4+ characters of its end, e.g. 7f3a)")
    r.add_argument("--root", help=root_help)
    r.set_defaults(func=cmd_retry)

    wa = sub.add_parser("watch", help="follow a job live until it ends (exit 0 succeeded, "
                        "1 failed, 3 cancelled)")
    wa.add_argument("job", metavar="JOB", help="the job id (or 4+ characters of its end, e.g. 7f3a)")
    wa.add_argument("--root", help=root_help)
    wa.add_argument("--poll-seconds", type=_positive_float, default=5.0,
                    help="how often to read the job's heartbeat and metrics (default: 5)")
    wa.add_argument("--no-progress", action="store_true", help="no progress bar")
    wa.set_defaults(func=cmd_watch)

    f = sub.add_parser("fetch", help="download a job's results, verified and resumable")
    f.add_argument("job", metavar="JOB", help="the job id (or 4+ characters of its end, e.g. 7f3a)")
    f.add_argument("--root", help=root_help)
    f.add_argument("--dest", default=".", help="folder to put <job_id>/ in (default: here)")
    f.add_argument("--checkpoints", action="store_true", help="the checkpoints too")
    f.set_defaults(func=cmd_fetch)

    cp = sub.add_parser("compare", help="differing hyperparameters, results and curves of jobs")
    cp.add_argument("jobs", metavar="JOB", nargs="+",
                    help="job ids (or unique ends), or globs of experiment names ('lr-*')")
    cp.add_argument("--root", help=root_help)
    cp.add_argument("--out", default="cherry-compare.png", help="where to write the curves of "
                    "all the jobs overlaid, as a PNG (default: cherry-compare.png)")
    cp.add_argument("--json", action="store_true", help="print the table as JSON (one object "
                    "per job) instead")
    cp.set_defaults(func=cmd_compare)

    i = sub.add_parser("init", help="remember a default queue root")
    i.add_argument("root", nargs="?", help="a folder, or gdrive:<folder> for a folder in your "
                   "Drive through the Drive API (default: <My Drive>/traina of Drive for "
                   "Desktop, if found)")
    i.set_defaults(func=cmd_init)

    d = sub.add_parser("demo", help="synthetic cherries -> submit -> train -> results")
    d.add_argument("--root", help="folder for the demo queue (default: a local demo folder)")
    d.add_argument("--train-images", type=_positive_int, default=1200,
                   help="synthetic training images, half good, half defective (default: 1200)")
    d.add_argument("--val-images", type=_positive_int, default=400,
                   help="synthetic validation images (default: 400)")
    d.add_argument("--epochs", type=_positive_int, default=8, help="(default: 8)")
    d.add_argument("--image-size", type=_positive_int, default=48,
                   help="training input size in pixels (default: 48, fast on a CPU)")
    d.add_argument("--model", default="resnet18",
                   help="any torchvision classification model (default: resnet18)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                   help="the least important log lines shown (default: info)")
    d.set_defaults(func=cmd_demo)

    dr = sub.add_parser("drive", help="Google Drive API access (for gdrive: roots)")
    drive_sub = dr.add_subparsers(dest="drive_command", required=True, metavar="ACTION")
    dl = drive_sub.add_parser("login", help="allow cherry-train to use your Drive (OAuth in "
                              "the browser; the token is saved for later runs)")
    dl.add_argument("--client-secrets", required=True, metavar="JSON",
                    help="the OAuth client (type 'Desktop app') downloaded from Google Cloud "
                    "console; see the README")
    dl.add_argument("--no-browser", action="store_true",
                    help="print the URL instead of opening a browser")
    dl.set_defaults(func=cmd_drive_login)

    da = sub.add_parser("data", help="prepare data folders for workers")
    data_sub = da.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    dp = data_sub.add_parser(
        "pack", help="pack a data folder into a few large shards beside it "
        "(<folder>.cherry-pack/), which workers copy much faster through the Drive mount than "
        "thousands of small files")
    dp.add_argument("path", help="the data folder (one folder per class inside)")
    dp.add_argument("--shard-mb", type=_positive_int, default=256,
                    help="shard size in MB (default: 256)")
    dp.add_argument("--no-progress", action="store_true", help="no progress bar")
    dp.set_defaults(func=cmd_data_pack)

    sc = sub.add_parser("schema", help="print the config's JSON Schema (for editors)")
    sc.set_defaults(func=cmd_schema)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        _err(*e.problems)
        return 2
    except (UsageError, WorkerIdInUse, NoSuchJob, NotRetryable, DriveAuthError) as e:
        _err(f"error: {e}")
        return 2
    except DriveError as e:  # Drive stayed unreachable through all retries: not a bug
        _err(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        return 130


def submit_main() -> int:
    return main(["submit", *sys.argv[1:]])


def worker_main() -> int:
    return main(["worker", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
