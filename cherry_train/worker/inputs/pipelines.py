"""Which input pipeline a job's batches come through (data.py serves them), and why: on a
small VM it decides the job's speed, so the choice is logged with its figures."""

from __future__ import annotations

import math
from collections.abc import Callable

import structlog
import torch

from cherry_train.schemas import TrainingConfig
from cherry_train.worker.inputs import gpudata, gpustream
from cherry_train.worker.inputs.samples import ImageFolderSamples

log = structlog.get_logger(__name__)


def gpu_free_memory(device: torch.device) -> int:
    """Free bytes on this CUDA device (choose_pipeline's seam: tests pass their own)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free


#: A split keeps a share of the set resident in steps of 1/SPLIT_STEPS: the same split on every
#: attempt unless the free memory moved across a step (a resident sample's pixels differ from a
#: streamed one's by resampling), and below one step streaming all of it is as fast.
SPLIT_STEPS = 20


def choose_pipeline(cfg: TrainingConfig, device: torch.device, train: ImageFolderSamples,
                    val: ImageFolderSamples,
                    free_memory: Callable[[torch.device], int] = gpu_free_memory,
                    ) -> tuple[str, float | None]:
    """performance.input_pipeline, and the resident share of a split; auto: the decoded cache
    in GPU memory if it fits, else as much of it as fits with the rest streamed through nvJPEG
    per batch, else loader processes. The choice is logged with its reason and its figures: it
    decides the job's speed on a small VM."""
    perf = cfg.performance
    wanted = perf.input_pipeline
    if wanted not in ("auto", "split") or perf.resident_share is not None:
        log.info("input pipeline", pipeline=wanted, why="performance.input_pipeline",
                 **({"resident_share": perf.resident_share} if perf.resident_share else {}))
        return wanted, perf.resident_share
    if device.type != "cuda":
        if wanted == "split":
            log.info("input pipeline", pipeline="split", resident_share=1.0,
                     why="not on a CUDA device: no GPU memory to size the split by, every "
                     "image decoded once (performance.resident_share sets a share)")
            return "split", 1.0
        log.info("input pipeline", pipeline="workers", why="not on a CUDA device")
        return "workers", None
    side = gpudata.stored_side(cfg.data.image_size, cfg.augmentation.min_crop_scale)
    n = len(train) + len(val)
    free = free_memory(device)
    budget = int(free * gpudata.GPU_SHARE)
    fits = budget // gpudata.decoded_bytes(1, side)
    facts = {"decoded_megabytes": round(gpudata.decoded_bytes(n, side) / 2**20),
             "gpu_free_megabytes": round(free / 2**20), "budget_megabytes": round(budget / 2**20),
             "side": side}
    if fits >= n:
        log.info("input pipeline", pipeline="gpu" if wanted == "auto" else "split",
                 why="the decoded images fit in a third of the free GPU memory",
                 resident_images=n, streamed_images=0, **facts)
        return ("gpu", None) if wanted == "auto" else ("split", 1.0)
    share = math.floor(fits / n * SPLIT_STEPS) / SPLIT_STEPS
    jpegs = gpustream.jpeg_share(train)
    facts.update(jpeg_share=round(jpegs, 3), resident_share=share)
    if wanted == "auto" and jpegs < 0.5:
        log.info("input pipeline", pipeline="workers", why="the decoded images would not fit "
                 "in GPU memory and most files are not JPEGs (nvJPEG decodes only those)",
                 **facts)
        return "workers", None
    resident = sum(resident_count("split", share, len(s)) for s in (train, val))
    counts = {"resident_images": resident, "streamed_images": n - resident}
    if wanted == "auto" and share == 0:
        log.info("input pipeline", pipeline="stream", why="the decoded images would not fit "
                 f"in a third of the free GPU memory, nor 1/{SPLIT_STEPS} of them: all JPEGs "
                 "decoded on the GPU per batch", **counts, **facts)
        return "stream", None
    log.info("input pipeline", pipeline="split", why=f"{share:.0%} of the decoded images fit in "
             f"a third of the free GPU memory (in steps of 1/{SPLIT_STEPS}): those decoded "
             "once, the rest decoded on the GPU per batch", **counts, **facts)
    return "split", share


def resident_count(pipeline: str, share: float | None, n: int) -> int:
    """How many of a set's n images a GPU pipeline keeps decoded (the first ones)."""
    if pipeline == "stream":
        return 0
    if pipeline == "split" and share is not None:
        return min(n, math.floor(share * n + 1e-9))  # k/20 * n exactly, whatever the rounding
    return n
