"""Training speed on a Colab-sized VM, reproduced on a big GPU box, in one run.

A Colab worker has 2 vCPUs (standard runtime), a T4/L4/A100 with 15-40 GB, and a data set that
often does not fit in GPU memory once decoded. This script makes those conditions on any CUDA
machine and measures what our users get (ResNet-50, 224 px, batch 256, 500x375 JPEGs, or
`--photo-size 1600x1200`: a sorting line's camera or a phone):

- the CPU: this process and every process it starts are pinned to `--cores` cores
  (`os.sched_setaffinity`, what `taskset -c 0,1` does), after the data set is generated;
- the GPU memory: another process holds all but `--gpu-free-gb` of it;
- the precision: `--amp fp16` forces a T4's fp16 + GradScaler;
- a restart: a worker process killed with SIGKILL mid-job, the job resumed by a new one (its
  first step after `worker started`, with the data cache kept and emptied);
- the data: `--images` training JPEGs (the large set; 60,000 at 317 px decoded is 18 GB) and a
  `--fit-images` subset of them (one that fits in a third of the free memory).

Rows: the seed recipe (ImageFolder + DataLoader + fp16 autocast, batch 32) on the same cores;
cherry-train through the real worker with `input_pipeline: auto` on the large set (what it
chooses, and why, is printed), `workers` forced, and `auto` on the fitting subset (the `gpu`
pipeline): the figure the large set is held to. Then the large set through a prepared pack
(`cherry data pack --image-size 224`, built ahead on all cores as a laptop would, its build
time and bytes printed; the worker copies its shards and reads the samples in place); the
restarts (through the pack); and, optionally, the large set again with `--t4-free-gb` free and
fp16 (through the pack when there is one). Each row can be left out (`--skip`). Steady
images/s from each job's own metrics after its first steps; compiling off by default
(`--compile on`: every cherry-train row compiled).

    python benchmarks/colab_vm.py [--cores 2] [--gpu-free-gb 40] [--images 60000]
                                  [--fit-images 20000] [--photo-size 500x375]
                                  [--t4-free-gb 16] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import make_dataset, seed_recipe  # noqa: E402


def hold_gpu_memory(free_gb: float) -> subprocess.Popen | None:
    """Start a process that takes GPU memory until `free_gb` GB are left; None if there is
    already no more than that."""
    torch.cuda.empty_cache()  # what earlier jobs of this process cached counts as used
    free, _ = torch.cuda.mem_get_info()
    take = free - int(free_gb * 2**30) - (600 << 20)  # the holder's own context takes ~0.5 GB
    if take <= 0:
        return None
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, torch\n"
         f"x = torch.empty({take}, dtype=torch.uint8, device='cuda')\n"
         "print('held', flush=True)\ntime.sleep(86400)"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def release(holder: subprocess.Popen | None) -> None:
    if holder is not None:
        holder.kill()
        holder.wait()
        time.sleep(1)


def photo_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give WIDTHxHEIGHT, e.g. 1600x1200") from None
    return width, height


def prepare_pack(train: Path, image_size: int = 224) -> dict:
    """A prepared pack of the training folder, as `cherry data pack --image-size` builds it
    (ahead of time, on every core: not part of the figure)."""
    from cherry_train import datapack
    from cherry_train.sizes import stored_side

    started = time.perf_counter()
    scale = datapack.DEFAULT_MIN_CROP_SCALE
    index, _, _ = datapack.pack_folder(train, encoding=datapack.Encoding(
        stored_side(image_size, scale)), prepared_for={"image_size": image_size,
                                                       "min_crop_scale": scale})
    originals = sum(f["size"] for f in index.files.values())
    return {"build_seconds": round(time.perf_counter() - started, 1), "pack_bytes": index.bytes,
            "original_bytes": originals, "ratio": round(index.bytes / originals, 3)}


def job(root: Path, train: str, epochs: int, performance: dict, amp: str,
        compile: str = "off", skip_steps: int = 40, pack: str = "off") -> dict:
    """One job through the real worker; steady images/s = the median of its 10-step windows
    after the first `skip_steps` steps (the loaders' and allocator's warm-up)."""
    from cherry_train.jobqueue.claims import WorkerIdentity
    from cherry_train.jobqueue.lifecycle import JobQueue
    from cherry_train.schemas import Result, validate_config
    from cherry_train.storage import LocalStorage
    from cherry_train.worker.loop import Worker, WorkerOptions

    queue = JobQueue(LocalStorage(root))
    cfg = {"name": "colab-vm", "amp": amp, "model": {"name": "resnet50", "num_classes": 2},
           "training": {"epochs": epochs, "batch_size": 256, "learning_rate": 0.001},
           "data": {"train_path": train, "val_path": "data/val", "image_size": 224,
                    "pack": pack},
           "checkpoint": {"every_minutes": 60}, "log_every_steps": 10,
           "performance": {"compile": compile, **performance}}
    job_id = queue.submit(validate_config(cfg)).job_id
    started = time.perf_counter()
    Worker(queue, WorkerIdentity("bench"), WorkerOptions(exit_when_idle=True)).run()
    wall = time.perf_counter() - started
    folder = root / "done" / job_id
    result = Result.from_json((folder / "result.json").read_bytes())
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    windows = [x["images_per_second"] for x in lines
               if x["kind"] == "train" and x["images_per_second"] and x["step"] > skip_steps]
    log = [json.loads(x) for x in (folder / "worker.log").read_text().splitlines()]
    events = {x.get("event"): x for x in log}
    chosen = events.get("input pipeline", {})
    return {"images_per_second": statistics.median(windows) if windows else None,
            "windows": len(windows), "state": result.state.value, "amp": result.amp,
            "pipeline": chosen.get("pipeline"), "why": chosen.get("why"),
            "first_step_s": events.get("first step", {}).get("seconds"),
            "loader_processes": events.get("loader processes", {}).get("loader_processes"),
            "micro_batch": result.micro_batch, "wall_seconds": round(wall, 1),
            "error": result.error.message if result.error else None}


def worker_process(root: Path, cache: Path, fault: str, timeout: float,
                   keep: Path | None) -> tuple[float, list[dict]]:
    """A `cherry worker --exit-when-idle` process with `CHERRY_FAULT=fault`: when it was
    launched and its JSON log lines (its whole output kept in `keep`, if given). It leads its
    own process group, which is killed whole once it ends, as Colab ends a runtime: nothing of
    it lives on into the next row. Its output goes to a file, not a pipe, which a process it
    left behind could hold open (a worker killed alone once left its loader processes alive,
    and a pipe read here waited for them for good)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CHERRY_CACHE_DIR": str(cache),
           "CHERRY_FAULT": fault}
    launched = time.time()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cherry_train", "worker", "--root",
                                 str(root), "--worker-id", "bench", "--exit-when-idle",
                                 "--poll-seconds", "0.5", "--log-format", "json"],
                                env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
            ended = ""
        except subprocess.TimeoutExpired:  # what it said until then is the clue
            ended = f"\nkilled after {timeout:.0f} s\n"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        out.seek(0)
        text = out.read() + ended
    if keep:
        keep.parent.mkdir(parents=True, exist_ok=True)
        keep.write_text(text)
    lines = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):  # a line that is not JSON (a warning)
            lines.append(json.loads(line))
    return launched, lines


def restart(root: Path, train: str, amp: str, pack: str, cache: Path, fresh: bool,
            model: str = "resnet50", batch: int = 256, size: int = 224, kill_at: int = 40,
            logs_to: Path | None = None, timeout: float = 90) -> dict:
    """A restarted worker's first step on a resumed job (issue 24: <= 15 s after `worker
    started`). A `cherry worker` process runs a job on `train` and is killed with SIGKILL at
    its step `kill_at` (`CHERRY_FAULT`, as a disconnect would); a new worker process with the
    same worker id resumes the job at once (the killed pid is gone: no lease to wait out).
    `fresh`: the data cache is emptied first (a new VM: the shards are copied again); else the
    new process finds it as the killed one left it (a restarted runtime). Seconds to the
    resumed attempt's first step from the new process's `worker started` and from its launch
    (Python and torch imports included), from the logs' own timestamps. The new process is
    killed too, at its third step: the rest of the epoch is no part of the figure (and 60,000
    images of it cost minutes of device time). Each worker gets `timeout` seconds; `logs_to`:
    its output and the job's worker.log are kept there, to read where the seconds went."""
    from datetime import datetime

    from cherry_train.jobqueue.lifecycle import JobQueue
    from cherry_train.schemas import validate_config
    from cherry_train.storage import LocalStorage

    cfg = {"name": "colab-vm-restart", "amp": amp, "model": {"name": model, "num_classes": 2},
           "training": {"epochs": 1, "batch_size": batch, "learning_rate": 0.001},
           "data": {"train_path": train, "val_path": "data/val", "image_size": size,
                    "pack": pack},
           "checkpoint": {"every_steps": kill_at // 2},
           "export": {"onnx": False}, "tensorboard": False}
    job_id = JobQueue(LocalStorage(root)).submit(validate_config(cfg)).job_id

    row = "fresh" if fresh else "kept"  # the kept logs' names begin with it

    def worker(fault: str) -> tuple[float, list[dict]]:
        keep = logs_to / f"{row}-{fault.replace('@', '-at-')}.log" if logs_to else None
        return worker_process(root, cache, fault, timeout, keep)

    worker(f"step@{kill_at}")
    if fresh:
        shutil.rmtree(cache, ignore_errors=True)
    launched, lines = worker("step@3")
    stamp = {}
    for e in lines:
        if e.get("event") in ("worker started", "first step") and "timestamp" in e:
            stamp.setdefault(e["event"], datetime.fromisoformat(e["timestamp"]).timestamp())
    log = []
    job_log = root / "done" / job_id / "worker.log"
    text = job_log.read_text() if job_log.exists() else ""
    if logs_to:
        (logs_to / f"{row}-job-worker.log").write_text(text)
    for line in text.splitlines():
        with contextlib.suppress(ValueError):  # a line cut short by the kill
            log.append(json.loads(line))
    resumed = [e for e in log if e.get("attempt", 0) >= 2]
    for e in resumed:  # the job's own log has the attempt's events when stdout lacks them
        if e.get("event") == "first step" and "first step" not in stamp:
            stamp["first step"] = datetime.fromisoformat(e["timestamp"]).timestamp()
    # Killed again, the job is still queued: out of the way of the next row's workers.
    (root / "queue" / f"{job_id}.json").unlink(missing_ok=True)
    result = root / "done" / job_id / "result.json"
    state = json.loads(result.read_text())["state"] if result.exists() else \
        "resumed, stopped at its third step"
    first = stamp.get("first step")
    started = stamp.get("worker started")
    timeline = {e["event"]: round(datetime.fromisoformat(e["timestamp"]).timestamp() - started, 1)
                for e in reversed(resumed) if started and "timestamp" in e and "event" in e}
    return {"state": state, "resumed_attempts": len({e.get("attempt") for e in resumed}),
            "from_worker_started_s": round(first - started, 1) if first and started else None,
            "from_launch_s": round(first - launched, 1) if first else None,
            "pipeline": next((e.get("pipeline") for e in resumed
                              if e.get("event") == "input pipeline"), None),
            # the resumed attempt's events, in seconds after its `worker started`
            "timeline": dict(sorted(timeline.items(), key=lambda kv: kv[1]))}


def pinned_rows(root: Path, tmp: Path, args, pack: dict) -> dict[str, dict]:
    """The rows run with GPU memory held to `--gpu-free-gb` (the cores are pinned already),
    in this order, each unless `--skip` names it; `pack`: the prepared pack's build figures."""
    def run(data: str, epochs: int, performance: dict, **kw) -> dict:
        return job(root, data, epochs, performance, args.amp, args.compile, **kw)

    packed = "auto" if pack else "off"  # what the restart rows read
    logs_to = args.out / "restart-logs" if args.out else None
    plan = [
        ("seed", "seed recipe, batch 32",
         lambda: {"images_per_second": seed_recipe(root / "data", 32)}),
        ("large", "cherry-train auto, large set", lambda: run("data/train", 2, {})),
        ("workers", "cherry-train workers",
         lambda: run("data/fit", 1, {"input_pipeline": "workers"})),
        ("fit", "cherry-train auto, fitting set", lambda: run("data/fit", 3, {})),
        ("prepared", "cherry-train auto, large set, prepared pack",
         lambda: {**run("data/train", 2, {}, pack="auto"), **pack}),
        ("restart", "restart, resumed with the cache kept",
         lambda: restart(root, "data/train", args.amp, packed, tmp / "restart-cache", False,
                         logs_to=logs_to)),
        ("restart", "restart, resumed on a fresh VM (empty cache)",
         lambda: restart(root, "data/train", args.amp, packed, tmp / "restart-cache", True,
                         logs_to=logs_to)),
    ]
    rows: dict[str, dict] = {}
    for key, name, measure in plan:
        if key not in args.skip:
            rows[name] = measure()
            print(f"{name}:", rows[name], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--gpu-free-gb", type=float, default=40.0)
    parser.add_argument("--amp", default="auto", choices=("auto", "fp16", "bf16"))
    parser.add_argument("--images", type=int, default=60_000)
    parser.add_argument("--fit-images", type=int, default=20_000)
    parser.add_argument("--photo-size", type=photo_size, default=(500, 375),
                        help="WIDTHxHEIGHT of the generated JPEGs (1600x1200: a camera's)")
    parser.add_argument("--t4-free-gb", type=float, default=16.0,
                        help="then the large set with this much free and fp16 (0: skip)")
    parser.add_argument("--skip", nargs="*", default=[], help="rows to leave out: seed, "
                        "large, workers, fit, t4, prepared, restart")
    parser.add_argument("--compile", default="off", choices=("off", "on"),
                        help="compile the model in the cherry-train rows (their first steps, "
                        "compiling included, are left out of the figure)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    from cherry_train import logs

    logs.configure("console", "warning")  # the jobs' info events still reach their worker.log
    card = torch.cuda.get_device_name()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        t = time.perf_counter()
        make_dataset(root / "data", args.images, args.photo_size)  # not measured
        train = root / "data" / "train"
        fit = root / "data" / "fit"
        for cls in ("defect", "good"):  # the first fit-images of the large set, hard-linked
            (fit / cls).mkdir(parents=True)  # (a data folder's symbolic links are never followed)
            for path in sorted((train / cls).iterdir())[: args.fit_images // 2]:
                os.link(path, fit / cls / path.name)
        size = "x".join(map(str, args.photo_size))
        print(f"data: {args.images} JPEGs {size} (+{args.images // 20} val) made in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        pack = {}
        readers = {"prepared", "restart"} | ({"t4"} if args.t4_free_gb else set())
        if readers - set(args.skip):  # a row that reads the pack runs
            pack = prepare_pack(train)
            print("prepared pack:", pack, flush=True)
        os.environ["CHERRY_CACHE_DIR"] = str(Path(tmp) / "cache")

        cores = sorted(os.sched_getaffinity(0))[: args.cores]
        os.sched_setaffinity(0, cores)  # inherited by every loader process started from here
        torch.set_num_threads(len(cores))
        holder = hold_gpu_memory(args.gpu_free_gb)
        free = torch.cuda.mem_get_info()[0] / 2**30
        print(f"{card}: pinned to cores {cores}, {free:.1f} GiB GPU memory free", flush=True)
        try:
            rows.update(pinned_rows(root, Path(tmp), args, pack))
        finally:
            release(holder)
        if args.t4_free_gb and "t4" not in args.skip:
            holder = hold_gpu_memory(args.t4_free_gb)
            try:
                t4 = job(root, "data/train", 1, {}, "fp16", args.compile,
                         pack="auto" if pack else "off")
                t4["gpu_free_gib"] = round(torch.cuda.mem_get_info()[0] / 2**30, 1)
                rows[f"cherry-train auto, large set, {args.t4_free_gb:g} GB free, fp16"] = t4
                print("t4-like:", t4, flush=True)
            finally:
                release(holder)

    report(rows, card, cores, free, args)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "colab_vm.json").write_text(json.dumps(
            {"card": card, "cores": cores, "torch": torch.__version__, "rows": rows}, indent=2))


def report(rows: dict[str, dict], card: str, cores: list[int], free: float, args) -> None:
    size = "x".join(map(str, args.photo_size))
    seed = rows.get("seed recipe, batch 32", {}).get("images_per_second")
    fits = rows.get("cherry-train auto, fitting set", {}).get("images_per_second")
    print(f"\n{card}, {len(cores)} cores, {free:.1f} GiB free, ResNet-50 224 px, batch 256 "
          f"(seed: 32), compile {args.compile}, "
          f"{args.images} JPEGs {size} (fitting set {args.fit_images})\n")
    print("| setup | pipeline | images/s | vs seed | vs fitting set |\n|---|---|---|---|---|")
    for name, row in rows.items():
        if "from_launch_s" in row:
            continue  # a restart: its figure is a time, below the table
        value = row.get("images_per_second")
        cells = [f"{value:.0f}" if value else "-",
                 f"{value / seed:.2f}x" if value and seed else "-",
                 f"{value / fits:.2f}x" if value and fits else "-"]
        print(f"| {name} | {row.get('pipeline', '-')} | " + " | ".join(cells) + " |")
    for name, row in rows.items():
        if row.get("why"):
            print(f"- {name}: {row['pipeline']} because {row['why']}; first step after "
                  f"{row.get('first_step_s')} s, {row.get('loader_processes')} loader "
                  f"processes, micro-batch {row.get('micro_batch')}")
        if "from_launch_s" in row:
            print(f"- {name}: first step {row['from_worker_started_s']} s after `worker "
                  f"started` ({row['from_launch_s']} s after the process was launched), "
                  f"{row['pipeline']}, job {row['state']}")
        if row.get("ratio"):
            print(f"- {name}: the pack is {row['ratio']}x the originals' bytes "
                  f"({row['pack_bytes'] / 2**30:.2f} of {row['original_bytes'] / 2**30:.2f} "
                  f"GiB), built in {row['build_seconds']} s on every core")


if __name__ == "__main__":
    main()
