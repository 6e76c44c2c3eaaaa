"""The input side sized to the machine: loader processes by cores and RAM."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cherry_train.worker.inputs.loaders import (
    LOADER_PROCESS_BYTES,
    available_memory,
    size_loader_pool,
    usable_cores,
)

GiB = 1 << 30


@pytest.mark.parametrize(("configured", "on_gpu", "cores", "free", "expected", "why"), [
    (None, True, 16, 64 * GiB, 8, "16 usable cores"),
    (None, True, 2, 12 * GiB, 2, "2 usable cores"),  # a standard Colab VM
    (None, False, 16, 64 * GiB, 0, "training on the CPU"),
    (8, True, 2, 64 * GiB, 2, "capped at the 2 cores"),  # asked for more than the VM has
    (4, False, 8, 64 * GiB, 4, "data.num_workers"),
    (None, True, 8, 2 * GiB, 1, "capped by RAM: 2.0 GiB available"),
    (None, True, 8, None, 8, "8 usable cores"),  # RAM unknown: cores decide
])
def test_loader_processes_fit_the_vm(configured, on_gpu, cores, free, expected, why):
    n, reason = size_loader_pool(configured, on_gpu, 64, 224, cores, free)
    assert n == expected and why in reason, reason


def test_ram_share_per_loader_counts_its_prefetched_batches():
    each = LOADER_PROCESS_BYTES + 2 * 256 * 3 * 224 * 224
    n, _ = size_loader_pool(None, True, 256, 224, 16, free=10 * each)
    assert n == 5  # half the RAM


def test_usable_cores_follow_the_affinity_mask():
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("Linux only")
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from cherry_train.worker.inputs.loaders import usable_cores; print(usable_cores())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
    assert usable_cores() == len(os.sched_getaffinity(0))


def test_available_memory_is_read_on_linux():
    if not os.path.exists("/proc/meminfo"):
        pytest.skip("Linux only")
    free = available_memory()
    assert free is not None and 0 < free < 1 << 50


def test_a_gpu_worker_starts_the_loader_server_at_once_and_goes_on_if_it_cannot(monkeypatch):
    """Its imports then overlap the first claim (a streamed first batch waited for them); a CPU
    worker leaves it to its first job's loaders, and a server that cannot start now is the
    first job's to start (or to report)."""
    import torch

    from cherry_train.worker.inputs import loaders

    started = []
    monkeypatch.setattr(loaders, "worker_context", lambda: started.append(1))
    loaders.start_server_early(torch.device("cpu"))
    assert started == []
    loaders.start_server_early(torch.device("cuda"))
    assert started == [1]

    def cannot():
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(loaders, "worker_context", cannot)
    loaders.start_server_early(torch.device("cuda"))  # no error: the worker goes on
