"""Whether to torch.compile the model: only where compiling pays back within the job.

Compiling ResNet-50's training graphs takes about a minute, cold, and makes each step faster
(by a third at batch 256 with bf16 on an H100; more with CUDA graphs at small batches, where
launching kernels is the cost). So a short job should not compile and a long one should.
`auto` times a few eager steps first, then compiles if the estimated saving over the steps
left is comfortably larger than the compile time.
"""

from __future__ import annotations

import os

import torch
from torch import nn

#: Eager steps skipped (cudnn autotuning, allocator warm-up), then timed.
PROBE_SKIP, PROBE_STEPS = 5, 20
#: Cold compile time and speed-up assumed for the decision (see docs/benchmarks.md).
COMPILE_SECONDS = 60.0
SPEEDUP = 1.3
#: Up to this micro-batch, CUDA graphs ("reduce-overhead"): per-kernel launch cost dominates.
#: ($CHERRY_CUDA_GRAPHS_MAX_BATCH overrides it, for measuring.)
CUDA_GRAPHS_MAX_BATCH = 64


def fixed_decision(mode: str, device: torch.device, deterministic: bool) -> tuple[bool, str] | None:
    """The decision where no timing is needed; None where `auto` must time steps first."""
    if mode == "off":
        return False, "performance.compile is off"
    if device.type != "cuda":
        return False, "not on a CUDA device"
    if deterministic:
        return False, "deterministic: true (compiled kernels may differ run to run)"
    if mode == "on":
        return True, "performance.compile is on"
    return None


def pays_back(remaining_steps: int, eager_step_seconds: float) -> tuple[bool, str]:
    saving = remaining_steps * eager_step_seconds * (1 - 1 / SPEEDUP)
    verdict = saving > 2 * COMPILE_SECONDS
    return verdict, (f"{remaining_steps} steps left at {eager_step_seconds * 1000:.0f} ms: "
                     f"compiling would save about {saving:.0f} s for about "
                     f"{COMPILE_SECONDS:.0f} s of compiling")


def compile_model(model: nn.Module, micro_batch: int):
    limit = int(os.environ.get("CHERRY_CUDA_GRAPHS_MAX_BATCH", CUDA_GRAPHS_MAX_BATCH))
    mode = "reduce-overhead" if micro_batch <= limit else "default"
    return torch.compile(model, mode=mode), mode
