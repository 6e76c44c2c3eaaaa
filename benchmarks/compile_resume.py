"""What compiling costs a resumed attempt on a fresh VM, with and without the compiled kernels
an earlier attempt stored with the job, in one run.

    python benchmarks/compile_resume.py [--images 12800] [--batch 256] [--model resnet50]

A job (compile on, a checkpoint every 5 steps) is started by a worker process and killed with
SIGKILL at step 40, as a Colab disconnect would. The queue root is then copied twice: in one
copy the stored kernels stay, in the other they are removed. Each copy is resumed by a new
worker process with an empty inductor cache of its own (what a fresh VM has). Every process is
a real `cherry worker`; the figures are from the jobs' own worker.log.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def worker(root: Path, cache: Path, fault: str | None = None) -> float:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_CACHE_DIR", None)  # inductor keeps Triton's cache inside its own
    env.pop("CHERRY_FAULT", None)
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
    """Per attempt: how its compile went."""
    out: dict[int, dict] = {}
    for e in events(root, job_id):
        if e.get("event") == "compiling the model":
            out.setdefault(e.get("attempt", 0), {})["earlier_kernels"] = e.get("earlier_kernels")
        if e.get("event") == "model compiled":
            out.setdefault(e.get("attempt", 0), {}).update(
                seconds=e["seconds"], cache_hits=e.get("cache_hits"),
                cache_misses=e.get("cache_misses"))
    return [out[k] for k in sorted(out)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12800)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
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
               "performance": {"compile": "on"}}
        job_id = JobQueue(LocalStorage(root)).submit(validate_config(cfg)).job_id
        first = worker(root, tmp / "inductor-1", fault="step@40")
        kernels = root / JobPaths(job_id).compiled_kernels
        size = kernels.stat().st_size if kernels.exists() else None
        print(f"first attempt, killed at step 40 after {first:.0f} s; stored kernels: "
              f"{size / 2**20:.1f} MB" if size else "first attempt stored no kernels", flush=True)
        kept, dropped = tmp / "kept", tmp / "dropped"
        shutil.copytree(root, kept, symlinks=True)
        shutil.copytree(root, dropped, symlinks=True)
        (dropped / JobPaths(job_id).compiled_kernels).unlink(missing_ok=True)
        time.sleep(6)  # the killed attempt's lease runs out
        worker(dropped, tmp / "inductor-2")
        worker(kept, tmp / "inductor-3")
        cold_first = compiles(root, job_id)
        cold, warm = compiles(dropped, job_id), compiles(kept, job_id)
        for name, where in (("removed", dropped), ("kept", kept)):
            result = json.loads((where / JobPaths(job_id).result).read_text())
            print(f"kernels {name}: job {result['state']} after {result['attempts']} attempts",
                  flush=True)
    print(f"\n{card}, {args.model} at {args.size} px, batch {args.batch}, compile on")
    print(f"first attempt (empty cache):                        {cold_first}")
    print(f"resumed on an empty cache, stored kernels removed:  {cold[-1] if cold else None}")
    print(f"resumed on an empty cache with the stored kernels:  {warm[-1] if warm else None}")


if __name__ == "__main__":
    main()
