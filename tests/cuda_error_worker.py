"""A worker whose job hits a real CUDA error (a device-side assert), run as its own process by
tests/test_gpu.py: after such an error no CUDA call of the process works again.

    python tests/cuda_error_worker.py ROOT     exits with the worker's exit code
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from cherry_train.jobqueue.claims import WorkerIdentity
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.schemas import validate_config
from cherry_train.storage import LocalStorage
from cherry_train.worker.loop import Worker, WorkerOptions


def trainer(run):
    index = torch.tensor([5], device="cuda")
    torch.zeros(2, device="cuda")[index].sum().item()  # out of bounds: device-side assert
    raise AssertionError("the CUDA error did not come")


if __name__ == "__main__":
    queue = JobQueue(LocalStorage(Path(sys.argv[1])))
    queue.submit(validate_config({
        "name": "cuda-error", "model": {"name": "resnet18", "num_classes": 2},
        "training": {"epochs": 1, "batch_size": 8, "learning_rate": 0.001},
        "data": {"train_path": "data/train", "val_path": "data/val"}}))
    worker = Worker(queue, WorkerIdentity("gpu"), WorkerOptions(poll_min_seconds=0.05),
                    trainer=trainer)
    sys.exit(worker.run())
