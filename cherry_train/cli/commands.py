"""The client commands of `cherry`: each turns its arguments into a call of cherry_train.client
(or the queue) and prints the answer. They run without torch."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from cherry_train.cli.common import (
    UsageError,
    cherry_command,
    err,
    picture_out,
    require_root,
    root_and_queue,
)
from cherry_train.cli.sweeps import cancel_sweep, compare_sweep, is_sweep, submit_sweep
from cherry_train.client.jobs import find_job, find_jobs
from cherry_train.jobqueue.views import job_view
from cherry_train.places import default_local_root, find_my_drive, save_root
from cherry_train.schemas import config_json_schema


def cmd_submit(args) -> int:
    from cherry_train import logs
    from cherry_train.client import submit as client
    from cherry_train.client.sweeps import check_sweep, with_sweep_flags

    logs.configure("auto", "warning")  # what it does is printed below, line by line
    config = client.load_config_file(Path(args.config), name=args.name, priority=args.priority)
    config = with_sweep_flags(config, args.sweep or [])
    resolved, queue = root_and_queue(args)
    config = client.resolve_evaluated_job(queue, config)
    # A sweep: every config it can produce is validated and each model name checked; the
    # data checks and smoke steps of pre-flight then run on trial 1's config.
    checked = check_sweep(config) if config.sweep else config
    if args.no_preflight:
        client.check_model_name(checked)  # validation, not pre-flight: always
        report = None
    else:
        report = client.preflight(checked, queue.storage.local_path(""), storage=queue.storage)
    space = client.check_space(queue.storage, checked, resolved.root)
    if report is not None and space is not None:
        report.checks.append(("space", space))
    print(f"root: {resolved.root} (from {resolved.source})")
    if report is not None:
        print(report.render())
    if config.sweep:
        submit_sweep(queue, config, str(Path(args.config).resolve()), client.submitted_by(),
                     client.__version__)
    else:
        manifest = client.submit(queue, config, str(Path(args.config).resolve()))
        print(f"queued: {manifest.name}, priority {manifest.priority}")
        print(manifest.job_id)
    if not client.live_workers(queue):
        err("warning: no worker has written a heartbeat to this root in the last "
            f"{client.WORKER_FRESH_SECONDS // 60} minutes; the job waits until one starts "
            "(run the Colab notebook or `cherry worker`)")
    return 0


def cmd_status(args) -> int:
    from cherry_train.client.status import free_space, job_rows, render_table, worker_rows
    from cherry_train.client.sweeps import summary_lines
    from cherry_train.client.waiting import mark_waiting
    from cherry_train.jobqueue.sweeps import Sweeps

    resolved, queue = root_and_queue(args)
    require_root(resolved, queue)
    rows, workers = job_rows(queue), worker_rows(queue)
    mark_waiting(rows, workers)  # a queued job that no live worker can run says why
    if args.state:
        rows = [r for r in rows if r["state"] == args.state]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"root: {resolved.root}{free_space(queue.storage)}")
    print(render_table(rows, workers, args.state))
    # Filtered, only what matches: the sweeps of the trials shown.
    shown = {r.get("sweep_id") for r in rows} - {None} if args.state else None
    sweeps = summary_lines(Sweeps(queue), only=shown)
    if sweeps:
        print("\nsweeps:")
        print("\n".join(f"  {line}" for line in sweeps))
    return 0


def cmd_cancel(args) -> int:
    import getpass
    import socket

    resolved, queue = root_and_queue(args)
    require_root(resolved, queue)
    if is_sweep(queue, args.job):
        return cancel_sweep(queue, args.job, f"{getpass.getuser()}@{socket.gethostname()}")
    job_id = find_job(queue, args.job)
    view = job_view(queue, job_id)
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
    resolved, queue = root_and_queue(args)
    require_root(resolved, queue)
    job_id = find_job(queue, args.job)
    manifest = queue.retry(job_id)
    step = queue.latest_checkpoint_step(job_id)
    where = f"from its checkpoint at step {step}" if step is not None else "from the start"
    print(f"queued {job_id} again: its next attempt resumes {where}, with the crash-loop count "
          f"started afresh (attempt {(manifest.retried_after_attempt or 0) + 1})")
    return 0


def cmd_watch(args) -> int:
    from cherry_train.client.watch import EXIT_CODES, watch

    resolved, queue = root_and_queue(args)
    require_root(resolved, queue)
    state = watch(queue, find_job(queue, args.job), poll_seconds=args.poll_seconds,
                  progress=not args.no_progress)
    return EXIT_CODES[state]


def cmd_fetch(args) -> int:
    from cherry_train.client.fetch import ChecksumMismatch, fetch
    from cherry_train.safepaths import UnsafePath

    resolved, queue = root_and_queue(args)
    require_root(resolved, queue)
    job_id = find_job(queue, args.job)
    dest = Path(args.dest) / job_id
    try:
        fetched = fetch(queue, job_id, dest, checkpoints=args.checkpoints)
    except ChecksumMismatch as e:
        err(f"error: {e}")
        return 1
    except UnsafePath as e:  # written by someone who can write the queue folder: not a bug
        err(f"error: {e}; nothing was fetched")
        return 1
    for f in fetched:
        print(f"{f.status:>10}  {f.bytes:>12,} B  {f.path}")
    if any(f.status == "unverified" for f in fetched):
        err("note: the job has no result yet; these files are as they are now, unverified")
    print(dest)
    return 0


def cmd_compare(args) -> int:
    from cherry_train.client.compare import comparison, overlay_png, render

    _, queue = root_and_queue(args)
    if len(args.jobs) == 1 and is_sweep(queue, args.jobs[0]):
        return compare_sweep(queue, args.jobs[0], args.out, args.json)
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
        err("note: no matplotlib here, so no plot (pip install matplotlib)")
        return 0
    out, replaced = picture_out(args.out)
    out.write_bytes(png)
    # With --json, stdout stays one JSON document.
    print(f"curves: {out.resolve()}{replaced}", file=sys.stderr if args.json else sys.stdout)
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
    result = run_demo(root, size, progress_bar=not args.no_progress,
                      cherry=cherry_command())  # next steps the user can type as printed
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
    from cherry_train.sizes import human_bytes, stored_side

    folder = Path(args.path)
    if not folder.is_dir():
        raise UsageError(f"{args.path} is not a folder (give the data folder itself, e.g. "
                         "data/train, whose class folders hold the images)")
    if args.image_size is None and \
            (args.quality, args.min_crop_scale, args.device) != (None, None, None):
        raise UsageError("--quality, --min-crop-scale and --device prepare a pack: give "
                         "--image-size N too (the data.image_size the pack is for)")
    encoding = prepared_for = device = None
    try:
        if args.image_size is not None:
            scale = args.min_crop_scale or datapack.DEFAULT_MIN_CROP_SCALE
            encoding = datapack.Encoding(stored_side(args.image_size, scale),
                                         args.quality or datapack.DEFAULT_QUALITY)
            prepared_for = {"image_size": args.image_size, "min_crop_scale": scale}
            device = datapack.pick_device(args.device or "auto")
        started = time.perf_counter()
        index, place, built = datapack.pack_folder(folder, args.shard_mb << 20,
                                                   progress=not args.no_progress,
                                                   encoding=encoding, prepared_for=prepared_for,
                                                   device=device)
    except datapack.PackError as e:
        raise UsageError(str(e)) from None
    size = human_bytes(index.bytes)
    what = "" if index.prepared is None else \
        f" prepared for short side {index.prepared['short_side']}"
    if not built:
        print(f"{place.description} is current: {len(index.files)} files{what} in "
              f"{len(index.shards)} shards ({size}); nothing to do")
        return 0
    if index.prepared is None:
        print(f"packed {len(index.files)} files of {folder} into {len(index.shards)} shards "
              f"({size}), checked against the folder: {place.description}")
    else:
        print(f"prepared {len(index.files):,} images of {folder} for data.image_size "
              f"{args.image_size} (short side {encoding.short_side}, JPEG quality "
              f"{encoding.quality}, {index.prepared['encoder']}): "
              f"{human_bytes(index.source_bytes)} → {size} "
              f"({index.bytes / max(1, index.source_bytes):.2f}×), "
              f"{time.perf_counter() - started:.0f} s, {len(index.shards)} shards, checked: "
              f"{place.description}\nIt serves data.image_size {args.image_size} and smaller "
              f"(augmentation.min_crop_scale {prepared_for['min_crop_scale']:g} or more); a "
              "job that needs larger images is told to rebuild it, never up-scaled.")
    if index.skipped:
        names = ", ".join(sorted(index.skipped)[:5]) + (", ..." if len(index.skipped) > 5 else "")
        print(f"left out {len(index.skipped)} files that do not decode as images: {names} "
              "(remove or replace them, then pack again)", file=sys.stderr)
    print(f"It takes {size} of Drive space beside the folder. Workers copy these shards "
          "instead of each file, and rebuild them when the folder changes (data.pack: off "
          "in a config does without).")
    return 0


def cmd_schema(args) -> int:
    print(config_json_schema())
    return 0
