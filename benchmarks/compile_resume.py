"""What compiling costs a resumed attempt on a fresh VM, with and without the compiled kernels
an earlier attempt stored with the job, in one run.

    python benchmarks/compile_resume.py [--images 12800] [--batch 256] [--model resnet50]

A job (compile on, a checkpoint every 5 steps) is started by a worker process holding a kernel
key ($CHERRY_KERNEL_KEY) and killed with SIGKILL at step 40, as a Colab disconnect would. The
queue root is then copied twice, each copy resumed by a new worker process with an empty
inductor cache of its own (what a fresh VM has): one with the same key (the stored kernels are
verified, then loaded), one without a key (the default: they are neither verified nor loaded).
Every process is a real `cherry worker`; the figures are from the jobs' own worker.log. The
MAC check is also timed alone on the stored file, in this process (the host's CPU).

Budget about 8 minutes on an H200 machine (its first attempt alone took 150 s there: worker
start, data cache, eager step, cold compile, 40 steps); each figure is printed as it is known.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def worker(root: Path, cache: Path, key: str | None, fault: str | None = None) -> float:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
    for name in ("TRITON_CACHE_DIR", "CHERRY_FAULT", "CHERRY_KERNEL_KEY", "CHERRY_CONFIG_DIR"):
        env.pop(name, None)  # inductor keeps Triton's cache inside its own; no other key
    env["CHERRY_CONFIG_DIR"] = str(cache / "config")  # no kernel-key file from this machine
    if key:
        env["CHERRY_KERNEL_KEY"] = key
    if fault:
        env["CHERRY_FAULT"] = fault
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cherry_train", "worker", "--root", str(root),
                    "--worker-id", "bench", "--exit-when-idle", "--poll-seconds", "0.5"],
                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - started


def events(root: Path, job_id: str) -> list[dict]:
    log = root / "done" / job_id / "worker.log"
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def compiles(root: Path, job_id: str) -> list[dict]:
    """Per attempt: how its compile went, and the seconds from its first log line to the end of
    its first compiled step (what a resume waits before training at compiled speed)."""
    from datetime import datetime

    out: dict[int, dict] = {}
    for e in events(root, job_id):
        attempt = out.setdefault(e.get("attempt", 0), {})
        if "timestamp" in e:
            attempt.setdefault("began", datetime.fromisoformat(e["timestamp"]))
        if e.get("event") == "first step":
            attempt["first_step"] = e["seconds"]
        if e.get("event") == "compiling the model":
            attempt["earlier_kernels"] = e.get("earlier_kernels")
        if e.get("event") == "model compiled":
            attempt.update(seconds=e["seconds"], cache_hits=e.get("cache_hits"),
                           cache_misses=e.get("cache_misses"))
            if "timestamp" in e:
                attempt["to_compiled_step"] = round(
                    (datetime.fromisoformat(e["timestamp"]) - attempt["began"])
                    .total_seconds(), 1)
    for attempt in out.values():
        attempt.pop("began", None)
    return [out[k] for k in sorted(out) if "seconds" in out[k]]


def mac_check_ms(data: bytes, job_id: str, key: str) -> float:
    """The median of 5 MAC checks of the stored file, in ms."""
    from cherry_train.worker.checkpoints.kernelseal import KernelSeal

    seal, times = KernelSeal(key.encode()), []
    for _ in range(5):
        started = time.perf_counter()
        seal.verify(data, job_id)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12800)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--logs", type=Path, help="copy each resumed job's worker.log here")
    args = parser.parse_args()
    import torch
    from train_throughput import make_dataset

    from cherry_train.jobqueue.layout import JobPaths
    from cherry_train.jobqueue.lifecycle import JobQueue
    from cherry_train.schemas import validate_config
    from cherry_train.storage import LocalStorage

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"card: {card}; torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_dataset(tmp / "data", args.images)
        os.environ["CHERRY_CACHE_DIR"] = str(tmp / "datacache")
        root = tmp / "root"
        root.mkdir()
        (root / "data").symlink_to(tmp / "data", target_is_directory=True)
        cfg = {"name": "resume", "model": {"name": args.model, "num_classes": 2},
               "training": {"epochs": 2, "batch_size": args.batch, "learning_rate": 0.001},
               "data": {"train_path": "data/train", "val_path": "data/val",
                        "image_size": args.size},
               "checkpoint": {"every_steps": 5}, "heartbeat_seconds": 1, "lease_seconds": 5,
               "performance": {"compile": "on"}, "export": {"onnx": False},
               "tensorboard": False}
        job_id = JobQueue(LocalStorage(root)).submit(validate_config(cfg)).job_id
        key = secrets.token_urlsafe(32)  # the root's workers' key, outside the queue folder
        print(f"\n{card}, {args.model} at {args.size} px, batch {args.batch}, compile on; "
              "each figure as soon as it is known", flush=True)
        first = worker(root, tmp / "inductor-1", key, fault="step@40")
        kernels = root / JobPaths(job_id).compiled_kernels
        size = kernels.stat().st_size if kernels.exists() else None
        print(f"first attempt (empty cache), killed at step 40 after {first:.0f} s: "
              f"{compiles(root, job_id)}; stored kernels: "
              + (f"{size / 2**20:.1f} MB" if size else "none"), flush=True)
        if size:
            print(f"MAC check of the stored file alone (median of 5): "
                  f"{mac_check_ms(kernels.read_bytes(), job_id, key):.1f} ms", flush=True)
        keyed, keyless = tmp / "keyed", tmp / "keyless"
        shutil.copytree(root, keyed, symlinks=True)
        shutil.copytree(root, keyless, symlinks=True)
        time.sleep(6)  # the killed attempt's lease runs out
        # The short one first: a run cut short still has the figure with stored kernels.
        for name, where, its_key, says in (
                ("keyed", keyed, key, "resumed with the key (kernels verified, loaded)"),
                ("keyless", keyless, None, "resumed without a key (kernels not loaded)")):
            wall = worker(where, tmp / f"inductor-{name}", its_key)
            result = json.loads((where / JobPaths(job_id).result).read_text())
            attempts = compiles(where, job_id)
            print(f"{says}: {attempts[-1] if attempts else None}; job {result['state']} after "
                  f"{result['attempts']} attempts, worker process {wall:.0f} s", flush=True)
            if args.logs:
                args.logs.mkdir(parents=True, exist_ok=True)
                shutil.copy(where / "done" / job_id / "worker.log",
                            args.logs / f"worker-{name}.log")

if __name__ == "__main__":
    main()
