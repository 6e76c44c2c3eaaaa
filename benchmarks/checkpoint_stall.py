"""How long a ResNet-50 + Adam checkpoint takes out of training: a synchronous save (torch.save,
fsync, rename: what cherry-train did before) against cherry-train's background checkpoint (a copy
of the state queued into pinned memory, the write on another thread), in one run.

The background figure is the time until the training thread may go on, plus (on a GPU) until the
queued copy has landed: the next step's kernels queue behind the copy, so that is what training
loses at most.

    python benchmarks/checkpoint_stall.py [--device cuda|cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision

from cherry_train.jobqueue.claims import WorkerIdentity
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.schemas import validate_config
from cherry_train.storage import LocalStorage
from cherry_train.worker.checkpoints.store import Checkpoints

RUNS = 3


def state(device: str):
    model = torchvision.models.resnet50(num_classes=2).to(device)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    model(torch.randn(2, 3, 64, 64, device=device)).sum().backward()
    opt.step()  # Adam's moments exist: the checkpoint is full size
    return model, opt


def measure(device: str) -> dict[str, float]:
    model, opt = state(device)
    with tempfile.TemporaryDirectory() as tmp:
        sync = []
        for i in range(RUNS):
            started = time.perf_counter()
            path = Path(tmp) / f"sync-{i}.pt"
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(path, Path(tmp) / "sync.pt")
            sync.append(time.perf_counter() - started)
        queue = JobQueue(LocalStorage(Path(tmp) / "root"))
        cfg = {"model": {"name": "resnet50", "num_classes": 2},
               "training": {"epochs": 1, "batch_size": 2, "learning_rate": 0.1},
               "data": {"train_path": "t", "val_path": "v"}}
        claim = queue.try_claim(queue.submit(validate_config({**cfg, "name": "stall"})),
                                WorkerIdentity("bench"))
        checkpoints = Checkpoints(queue.owner(claim), Path(tmp) / "scratch", keep_last=2)
        stall, total = [], []
        for i in range(RUNS):
            started = time.perf_counter()
            checkpoints.save_in_background(
                i + 1, lambda: {"model": model.state_dict(), "optimizer": opt.state_dict()})
            if device == "cuda":
                torch.cuda.synchronize()
            stall.append(time.perf_counter() - started)
            checkpoints.wait()
            total.append(time.perf_counter() - started)
        size = (Path(tmp) / "sync.pt").stat().st_size
    return {"bytes": size, "synchronous_s": statistics.median(sync),
            "background_stall_s": statistics.median(stall),
            "background_write_s": statistics.median(total)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    cpu = f"CPU ({os.cpu_count()} cores)"
    where = torch.cuda.get_device_name() if args.device == "cuda" else cpu
    r = measure(args.device)
    print(f"{where}: checkpoint of {r['bytes'] / 1e6:.0f} MB; median of {RUNS}")
    print(f"  synchronous save:               {r['synchronous_s']:.3f} s of training")
    print(f"  background (copy, then thread): {r['background_stall_s']:.3f} s of training "
          f"({r['synchronous_s'] / r['background_stall_s']:.0f}x less; the write itself "
          f"{r['background_write_s']:.3f} s)")


if __name__ == "__main__":
    main()
