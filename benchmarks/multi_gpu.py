"""One job over 1, 2 and 4 GPUs of one host, in one run: the same job end to end (JPEG files on
disk, the real worker, `--gpus N`), ResNet-50 at 224 px, 256 images per GPU (batch_size 256 x N,
the global batch). Reports each count's steady images/s (median of the logging windows after
the first epoch) and its scaling against 1 GPU in the same run. Goals (issue 15): >= 1.9x on 2
GPUs, >= 3.6x on 4.

    python benchmarks/multi_gpu.py [--images 20000] [--epochs 2] [--gpus 1,2,4] [--per-gpu 256]

Counts above the GPUs visible are skipped. Without CUDA it runs CPU ranks (gloo) with a small
model at 64 px, to try the script, not to measure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import make_dataset  # noqa: E402  (the same JPEG set)

from cherry_train.jobqueue.claims import WorkerIdentity  # noqa: E402
from cherry_train.jobqueue.lifecycle import JobQueue  # noqa: E402
from cherry_train.schemas import Result, validate_config  # noqa: E402
from cherry_train.storage import LocalStorage  # noqa: E402
from cherry_train.worker.loop import Worker, WorkerOptions  # noqa: E402
from cherry_train.worker.multigpu.distributed import NCCL_SETTINGS  # noqa: E402


def run_job(root: Path, data: Path, gpus: int, per_gpu: int, epochs: int, cuda: bool) -> dict:
    root.mkdir()
    (root / "data").symlink_to(data, target_is_directory=True)
    queue = JobQueue(LocalStorage(root))
    cfg = {"name": f"gpus-{gpus}",
           "model": {"name": "resnet50" if cuda else "resnet18", "num_classes": 2},
           "training": {"epochs": epochs, "batch_size": per_gpu * gpus, "learning_rate": 1e-3},
           "data": {"train_path": "data/train", "val_path": "data/val",
                    "image_size": 224 if cuda else 64},
           "checkpoint": {"every_minutes": 60}, "log_every_steps": 10, "lease_seconds": 600,
           "export": {"onnx": False}, "tensorboard": False,
           # Eager on every count: multi-GPU jobs do not compile yet, so neither does 1 GPU.
           "performance": {"compile": "off"}}
    job_id = queue.submit(validate_config(cfg)).job_id
    started = time.perf_counter()
    Worker(queue, WorkerIdentity(f"bench-{gpus}"),
           WorkerOptions(exit_when_idle=True, gpus=gpus)).run()
    wall = time.perf_counter() - started
    job = root / "done" / job_id
    result = Result.from_json((job / "result.json").read_bytes())
    lines = [json.loads(x) for x in (job / "metrics.jsonl").read_text().splitlines()]
    windows = [x["images_per_second"] for x in lines if x["kind"] == "train"
               and x["epoch"] >= min(2, epochs) and x.get("images_per_second")]
    return {"gpus": result.ranks, "state": result.state.value, "device": result.device,
            "steady_images_per_second": statistics.median(windows) if windows else None,
            "result_images_per_second": result.images_per_second,
            "wall_seconds": round(wall, 1), "gpu_hours": result.gpu_hours}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--gpus", default="1,2,4")
    parser.add_argument("--per-gpu", type=int, default=256)
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    os.environ.update(NCCL_SETTINGS)
    cuda = torch.cuda.is_available() and os.environ.get("CHERRY_DEVICE", "cuda") != "cpu"
    visible = torch.cuda.device_count() if cuda else 4
    counts = [n for n in map(int, args.gpus.split(",")) if n <= visible]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("CHERRY_CACHE_DIR", str(Path(tmp) / "cache"))
        data = Path(tmp) / "jpegs"
        make_dataset(data, args.images)
        figures = []
        for n in counts:
            figures.append(run_job(Path(tmp) / f"root-{n}", data, n, args.per_gpu, args.epochs,
                                   cuda))
            print(json.dumps(figures[-1]), flush=True)
    base = figures[0]["steady_images_per_second"] if figures else None
    print(f"\n{torch.cuda.get_device_name(0) if cuda else 'CPU ranks (gloo)'}, "
          f"{os.cpu_count()} cores; {args.images} JPEGs, {args.per_gpu} images per GPU")
    print(f"{'GPUs':>5}{'batch':>7}{'images/s':>11}{'scaling':>9}{'wall s':>8}")
    for f in figures:
        speed = f["steady_images_per_second"]
        scaling = speed / base if speed and base else float("nan")
        print(f"{f['gpus']:>5}{f['gpus'] * args.per_gpu:>7}{speed or float('nan'):>11.0f}"
              f"{scaling:>8.2f}x{f['wall_seconds']:>8.0f}")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
