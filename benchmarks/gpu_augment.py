"""Cost of the GPU input pipeline's per-batch work, apart from training: the crop/flip
parameters on the CPU (per-sample generators), and the gather + roi_align + normalise on the
GPU, at batch 32 and 256 (ResNet-50's 224 px, a 317 px stored copy).

    python benchmarks/gpu_augment.py
"""

from __future__ import annotations

import time

import numpy as np
import torch

from cherry_train.worker.inputs.gpudata import DecodedImages, GpuBatches
from cherry_train.worker.inputs.samples import EpochSampler


def main() -> None:
    device = torch.device("cuda")
    n, side = 20000, 317
    decoded = DecodedImages(torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8,
                                          device=device),
                            np.tile(np.array([[500, 375]]), (n, 1)),
                            torch.randint(0, 2, (n,), device=device), 0.0)
    print(f"card: {torch.cuda.get_device_name()}")
    for batch in (32, 256):
        gpu = GpuBatches(decoded, EpochSampler(n, 0, True), batch, 224, True, 0.5, 0, True,
                         drop_last=True)
        indices = list(range(batch))
        started = time.perf_counter()
        for _ in range(50):
            gpu.boxes(1, indices)
        cpu_ms = (time.perf_counter() - started) / 50 * 1000
        meta = gpu.boxes(1, indices).pin_memory()
        for _ in range(5):
            gpu.batch(meta)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(50):
            gpu.batch(meta)
        torch.cuda.synchronize()
        total_ms = (time.perf_counter() - started) / 50 * 1000
        print(f"batch {batch}: crop parameters on the CPU {cpu_ms:.2f} ms (in loader "
              f"processes); crops on the GPU, synchronised {total_ms:.2f} ms")


if __name__ == "__main__":
    main()
