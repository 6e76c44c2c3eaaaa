"""The `cherry` command line: every subcommand, its arguments and their help."""

from __future__ import annotations

import argparse

from cherry_train import __version__
from cherry_train.cli.commands import (
    cmd_cancel,
    cmd_compare,
    cmd_data_pack,
    cmd_demo,
    cmd_drive_login,
    cmd_fetch,
    cmd_init,
    cmd_retry,
    cmd_schema,
    cmd_status,
    cmd_submit,
    cmd_watch,
)
from cherry_train.cli.fleet import cmd_drain
from cherry_train.cli.sweeps import cmd_sweep_best
from cherry_train.cli.tensorboard import cmd_tensorboard
from cherry_train.cli.worker import cmd_worker
from cherry_train.client.watch import EXIT_CODES
from cherry_train.schemas import JobState

JOB_HELP = "the job id (or 4+ characters of its end, e.g. 7f3a)"


def _gpus(text: str) -> int | None:
    """`--gpus all` (None: every visible GPU) or a count."""
    if text == "all":
        return None
    try:
        return _positive_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GPUs or 'all', got {text!r}"
                                         ) from None


def _jpeg_quality(text: str) -> int:
    value = int(text)
    if not 50 <= value <= 95:  # below 50 costs accuracy; above 95 only bytes (Pillow's advice)
        raise argparse.ArgumentTypeError(f"must be 50 to 95, got {value}")
    return value


def _crop_scale(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, got {value:g}")
    return value


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
    s.add_argument("--sweep", action="append", metavar="PATH=V1,V2",
                   help="sweep this config field over these values (repeatable; a grid sweep "
                   "unless the config's sweep: section says otherwise), e.g. "
                   "--sweep training.learning_rate=1e-3,3e-4,1e-4")
    s.set_defaults(func=cmd_submit)

    w = sub.add_parser("worker", help="claim and train jobs until stopped")
    w.add_argument("--root", help=root_help)
    w.add_argument("--worker-id", help="a stable id (e.g. per notebook): a restarted worker with "
                   "the same id takes its own stalled job back at once (default: host name)")
    w.add_argument("--exit-when-idle", action="store_true", help="exit when nothing is claimable")
    w.add_argument("--threads", type=_positive_int, help="torch CPU threads (pin it for "
                   "bit-exact resume on CPU)")
    w.add_argument("--gpus", type=_gpus, metavar="N|all",
                   help="train each job over N GPUs of this host at once (torch.distributed, "
                   "one process per GPU; default: all visible). Without CUDA (or with "
                   "CHERRY_DEVICE=cpu), N processes on the CPU, for trying it out")
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
    w.add_argument("--kernel-key-file", metavar="PATH",
                   help="the key that signs compiled kernels stored with a job, so a resumed "
                   "attempt loads only those its own workers stored (give every worker of the "
                   "root the same key; default: $CHERRY_KERNEL_KEY, else kernel-key in the "
                   "config folder; without one, kernels are not stored)")
    w.add_argument("--webhook", metavar="URL",
                   help="POST a message here when a job this worker runs ends (succeeded, "
                   "failed, pruned, cancelled, handed back after an error): a Slack or Discord "
                   "incoming webhook, or an ntfy topic URL; a job's own notify.webhook gets it "
                   "too (default: $CHERRY_WEBHOOK)")
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
    st.add_argument("--state", choices=[s.value for s in JobState],
                    help="only jobs in this state")
    st.set_defaults(func=cmd_status)

    c = sub.add_parser("cancel", help="cancel a queued or running job, or a whole sweep")
    c.add_argument("job", metavar="JOB", help=f"{JOB_HELP}, or sweep:SWEEP for every trial of "
                   "a sweep")
    c.add_argument("--root", help=root_help)
    c.set_defaults(func=cmd_cancel)

    r = sub.add_parser("retry", help="put a failed or cancelled job back in the queue; it "
                       "resumes from its newest checkpoint")
    r.add_argument("job", metavar="JOB", help=JOB_HELP)
    r.add_argument("--root", help=root_help)
    r.set_defaults(func=cmd_retry)

    dn = sub.add_parser("drain", help="let a worker finish the job it trains, take no new one "
                        "and exit (to hand its VM back without losing an epoch or a job)")
    dn.add_argument("worker_id", metavar="WORKER_ID", help="the worker's id, as `cherry status` "
                    "lists it")
    dn.add_argument("--root", help=root_help)
    dn.set_defaults(func=cmd_drain)

    outcomes = ", ".join(f"{code} {state.value}" for state, code in EXIT_CODES.items())
    wa = sub.add_parser("watch", help=f"follow a job live until it ends (exit {outcomes})")
    wa.add_argument("job", metavar="JOB", help=JOB_HELP)
    wa.add_argument("--root", help=root_help)
    wa.add_argument("--poll-seconds", type=_positive_float, default=5.0,
                    help="how often to read the job's heartbeat and metrics (default: 5)")
    wa.add_argument("--no-progress", action="store_true", help="no progress bar")
    wa.set_defaults(func=cmd_watch)

    f = sub.add_parser("fetch", help="download a job's results, verified and resumable")
    f.add_argument("job", metavar="JOB", help=JOB_HELP)
    f.add_argument("--root", help=root_help)
    f.add_argument("--dest", default=".", help="folder to put <job_id>/ in (default: here)")
    f.add_argument("--checkpoints", action="store_true", help="the checkpoints too")
    f.set_defaults(func=cmd_fetch)

    cp = sub.add_parser("compare", help="differing hyperparameters, results and curves of jobs")
    cp.add_argument("jobs", metavar="JOB", nargs="+",
                    help="job ids (or unique ends), or globs of experiment names ('lr-*'), or "
                    "sweep:SWEEP for a sweep's trials ranked")
    cp.add_argument("--root", help=root_help)
    cp.add_argument("--out", help="where to write the curves of all the jobs overlaid, as a "
                    "PNG (default: cherry-compare.png here, or cherry-compare-2.png, ... if "
                    "taken: an earlier one is never overwritten)")
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
    dp.add_argument("--image-size", type=_positive_int, metavar="N",
                    help="prepare the pack for training at data.image_size N: every image "
                    "re-encoded once, at the short side that size stores (baseline JPEG), so "
                    "workers read and decode far fewer bytes; it serves any image size up to N "
                    "(default: the files as they are)")
    dp.add_argument("--quality", type=_jpeg_quality, default=None, metavar="Q",
                    help="JPEG quality of prepared images, 50-95 (default: 90, no measurable "
                    "accuracy cost)")
    dp.add_argument("--min-crop-scale", type=_crop_scale, default=None, metavar="S",
                    help="augmentation.min_crop_scale of the jobs the pack is for: a smaller "
                    "scale crops smaller areas, which need a larger stored side (default: 0.5, "
                    "the config's default)")
    dp.add_argument("--device", choices=["auto", "cuda", "cpu"], default=None,
                    help="where a prepared pack's images are decoded, resized and encoded: cuda "
                    "(torchvision with nvJPEG on the GPU: for a Colab GPU runtime, whose 2 "
                    "vCPUs would take many minutes), cpu (Pillow, a process per core, JPEG "
                    "draft mode), auto (cuda when there is one; the default)")
    dp.add_argument("--no-progress", action="store_true", help="no progress bar")
    dp.set_defaults(func=cmd_data_pack)

    sw = sub.add_parser("sweep", help="a sweep's results")
    sweep_sub = sw.add_subparsers(dest="sweep_command", required=True, metavar="ACTION")
    sb = sweep_sub.add_parser("best", help="print the best trial's config as YAML, ready to "
                              "submit for a full run")
    sb.add_argument("sweep", metavar="SWEEP", help="the sweep id (or its last 4+ characters)")
    sb.add_argument("--root", help=root_help)
    sb.set_defaults(func=cmd_sweep_best)

    tb = sub.add_parser("tensorboard", help="TensorBoard over the root's jobs (an API root's "
                        "event files are copied here first)")
    tb.add_argument("--root", help=root_help)
    tb.add_argument("--port", type=_positive_int, default=6006,
                    help="the port TensorBoard listens on (default: 6006)")
    tb.add_argument("--logdir-only", action="store_true",
                    help="print the folder to give TensorBoard's --logdir, and exit")
    tb.set_defaults(func=cmd_tensorboard)

    sc = sub.add_parser("schema", help="print the config's JSON Schema (for editors)")
    sc.set_defaults(func=cmd_schema)
    return p
