"""Whether to torch.compile the model: only where compiling pays back within the job.

Compiling ResNet-50's training graphs takes up to a minute (30-58 s on an H100; more on a Colab
VM's slower CPU), and then makes each step faster: 1.39x at batch 256 (bf16, default mode) and
2.41x at batch 32, where CUDA graphs remove the per-kernel launch cost that dominates small
batches (real jobs on an H100, same run, docs/benchmarks.md). So a short job should not
compile and a long one should. `auto` times a few eager steps first, then compiles if the
estimated saving over the steps left is comfortably larger than the compile time.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

#: Eager steps skipped (cudnn autotuning, allocator warm-up), then timed.
PROBE_SKIP, PROBE_STEPS = 5, 20
#: Cold compile time and speed-ups assumed for the decision (measured, see the docstring).
COMPILE_SECONDS = 60.0
SPEEDUP = {"default": 1.39, "reduce-overhead": 2.41}
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


def mode_for(micro_batch: int) -> str:
    limit = int(os.environ.get("CHERRY_CUDA_GRAPHS_MAX_BATCH", CUDA_GRAPHS_MAX_BATCH))
    return "reduce-overhead" if micro_batch <= limit else "default"


def pays_back(remaining_steps: int, eager_step_seconds: float,
              micro_batch: int) -> tuple[bool, str]:
    saving = remaining_steps * eager_step_seconds * (1 - 1 / SPEEDUP[mode_for(micro_batch)])
    verdict = saving > 2 * COMPILE_SECONDS
    return verdict, (f"{remaining_steps} steps left at {eager_step_seconds * 1000:.0f} ms: "
                     f"compiling would save about {saving:.0f} s for about "
                     f"{COMPILE_SECONDS:.0f} s of compiling")


def compile_model(model: nn.Module, micro_batch: int, backend: str | Callable = "inductor"):
    """The model compiled for this job, as if in a fresh process.

    A worker trains many jobs in one process, and dynamo's caches are per code object, not per
    model: a second job at another batch size would otherwise get a graph with a symbolic batch
    dimension (automatic dynamic shapes), measured 30% slower than the static one at batch 256
    on an H100, and after 8 jobs dynamo would stop compiling altogether (its recompile limit).
    The batch shape is fixed within a job, so the graph is compiled static."""
    torch._dynamo.reset()
    mode = mode_for(micro_batch)
    return torch.compile(model, mode=mode, dynamic=False, backend=backend), mode
