"""Whether to torch.compile the model: only where compiling pays back within the job.

Compiling ResNet-50's training graphs takes up to a minute (30-58 s on an H100; more on a Colab
VM's slower CPU), and then makes each step faster: 1.39x at batch 256 (bf16, default mode) and
2.41x at batch 32, where CUDA graphs remove the per-kernel launch cost that dominates small
batches (real jobs on an H100, same run, docs/benchmarks.md). So a short job should not
compile and a long one should. `auto` times a few eager steps first, then compiles if the
estimated saving over the steps left is comfortably larger than the compile time.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from enum import Enum
from typing import TypeVar

import structlog
import torch
from torch import nn

from cherry_train import logs
from cherry_train.jobqueue.owner import Fenced, Owner
from cherry_train.schemas import Phase
from cherry_train.worker.checkpoints.kernelseal import KernelSeal, Unverified

log = structlog.get_logger(__name__)
T = TypeVar("T")

#: Eager steps skipped (cudnn autotuning, allocator warm-up), then timed.
PROBE_SKIP, PROBE_STEPS = 5, 20
#: Cold compile time and speed-ups assumed for the decision (measured, see the docstring).
COMPILE_SECONDS = 60.0
#: ... and from the kernels an earlier attempt stored (see the end of this module): 4.0 s
#: against 49.5 s without them, ResNet-50 at batch 256 resumed on an empty cache, H100; more
#: on a Colab VM's slower CPU, hence 10.
COMPILE_SECONDS_WARM = 10.0
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


def pays_back(remaining_steps: int, eager_step_seconds: float, micro_batch: int,
              warm: bool = False) -> tuple[bool, str]:
    """Whether compiling pays back over the steps left; `warm`: an earlier attempt's compiled
    kernels are stored with the job (see below), so compiling costs less."""
    cost = COMPILE_SECONDS_WARM if warm else COMPILE_SECONDS
    saving = remaining_steps * eager_step_seconds * (1 - 1 / SPEEDUP[mode_for(micro_batch)])
    verdict = saving > 2 * cost
    return verdict, (f"{remaining_steps} steps left at {eager_step_seconds * 1000:.0f} ms: "
                     f"compiling would save about {saving:.0f} s for about {cost:.0f} s of "
                     f"compiling{' from stored kernels' if warm else ''}")


def compile_model(model: nn.Module, micro_batch: int, backend: str | Callable = "inductor"):
    """The model compiled for this job, as if in a fresh process.

    A worker trains many jobs in one process, and dynamo's caches are per code object, not per
    model: a second job at another batch size would otherwise get a graph with a symbolic batch
    dimension (automatic dynamic shapes): 4,210 images/s against 5,352 static at batch 256 (two
    H100 runs); and after 8 jobs dynamo would stop compiling altogether (its recompile limit).
    The batch shape is fixed within a job, so the graph is compiled static."""
    torch._dynamo.reset()
    _forget_recorded_kernels()
    mode = mode_for(micro_batch)
    return torch.compile(model, mode=mode, dynamic=False, backend=backend), mode


# -- compiled kernels kept between attempts ------------------------------------------------------
# A resumed attempt usually runs on a fresh VM (Colab), whose inductor cache on disk is empty, so
# it would compile from scratch again. torch's "mega-cache" packs what a compile produced into
# bytes; stored with the job, it turns the next attempt's compile into cache hits. They are code
# the worker runs (unlike checkpoints, loaded weights_only), so they are stored signed and loaded
# only once their MAC verifies (kernelseal.py), and without the workers' key not at all.

_MAGIC = b"cherry-train compiled kernels\n"


def _forget_recorded_kernels() -> None:
    """torch records every compile of the process for packing; a job packs only its own."""
    try:
        from torch.compiler._cache import CacheArtifactManager
    except ImportError:  # torch < 2.7: nothing recorded, nothing to pack
        return
    CacheArtifactManager.clear()


def kernels_key(mode: str, micro_batch: int, device: torch.device) -> dict[str, str | int]:
    """What the packed kernels were compiled for; another GPU, torch or Triton cannot use
    them."""
    try:
        import triton
    except ImportError:  # no Triton, no inductor kernels for CUDA: the key says so
        triton = None
    return {"torch": torch.__version__, "triton": getattr(triton, "__version__", None),
            "device": torch.cuda.get_device_name(device), "mode": mode,
            "micro_batch": micro_batch}


def pack_kernels(key: dict) -> bytes | None:
    """This process's compile output (None where torch cannot save it)."""
    save = getattr(torch.compiler, "save_cache_artifacts", None)  # torch >= 2.7
    if save is None:
        return None
    saved = save()
    if not saved:
        return None
    return _MAGIC + json.dumps(key, sort_keys=True).encode() + b"\n" + saved[0]


def unpack_kernels(data: bytes, key: dict) -> str | None:
    """Load packed kernels into torch's caches, before compiling; None if loaded, else why
    not. `data` must be verified first (KernelSeal.verify): loading runs its code."""
    load = getattr(torch.compiler, "load_cache_artifacts", None)
    if load is None:
        return "this torch cannot load compiled kernels"
    if not data.startswith(_MAGIC):
        return "not a compiled-kernels file"
    header, _, artifacts = data[len(_MAGIC):].partition(b"\n")
    try:
        stored = json.loads(header)
    except ValueError:
        return "unreadable header"
    if stored != key:
        return f"compiled for another set-up ({stored})"
    load(artifacts)
    return None


def cache_counts() -> dict[str, int]:
    """Inductor's graph-cache hits and misses so far in this process (for the log)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    inductor = counters["inductor"]
    return {"cache_hits": inductor["fxgraph_cache_hit"],
            "cache_misses": inductor["fxgraph_cache_miss"]}


# -- one attempt's decision, and its compiled model ------------------------------------------------

class CompileState(Enum):
    undecided = "undecided"  # timing eager steps (auto), or not yet looked at
    first_step = "first-step"  # compiled: the next step runs the compiler
    on = "on"
    off = "off"


class TorchCompiler:
    """torch.compile and torch's kernel cache, as Compilation uses them: the seam tests replace
    (nothing compiles on a CPU)."""

    decide = staticmethod(fixed_decision)
    compile = staticmethod(compile_model)
    key = staticmethod(kernels_key)
    pack = staticmethod(pack_kernels)
    unpack = staticmethod(unpack_kernels)


class Compilation:
    """Whether and when this attempt compiles its model, the compiled model once it does, and
    the kernels it packs for the next attempt (signed, stored with the next checkpoint)."""

    def __init__(self, compiler: TorchCompiler, model: nn.Module, device: torch.device,
                 mode: str, deterministic: bool, owner: Owner, seal: KernelSeal,
                 report: Callable[..., None]):
        self.compiler, self.model, self.device = compiler, model, device
        self.mode, self.deterministic = mode, deterministic
        self.owner, self.seal, self.report = owner, seal, report
        self.job_id, self.kernels_path = owner.claim.job_id, owner.claim.paths.compiled_kernels
        self.state = CompileState.undecided
        self.compiled: nn.Module | None = None  # same parameters as the model
        self.steps = 0  # steps this attempt has taken while undecided
        self.probe: tuple[float, int] | None = None  # (time, step) where eager timing began
        self.key: dict | None = None  # what the compiled kernels are for
        self.kernels: bytes | None = None  # packed, waiting for the next checkpoint

    def model_for_step(self) -> nn.Module:
        return self.model if self.compiled is None else self.compiled

    def consider(self, micro: int, steps_left: int) -> None:
        """performance.compile: decided at once where no timing is needed, else after timing a
        few eager steps (two host syncs, once per attempt). Called after each step while
        undecided."""
        self.steps += 1
        decided = self.compiler.decide(self.mode, self.device, self.deterministic)
        if decided is None and steps_left < 4 * PROBE_STEPS:
            decided = False, "too few steps left to be worth timing, let alone compiling"
        if decided is None:
            if self.steps == PROBE_SKIP:
                torch.cuda.synchronize(self.device)
                self.probe = (time.perf_counter(), self.steps)
            if self.probe is None or self.steps < self.probe[1] + PROBE_STEPS:
                return
            torch.cuda.synchronize(self.device)
            step_seconds = (time.perf_counter() - self.probe[0]) / (self.steps - self.probe[1])
            stored = self.seal.enabled and self.owner.reader.exists(self.kernels_path)
            decided = pays_back(steps_left, step_seconds, micro, warm=stored)
        compile_it, why = decided
        if compile_it:
            mode = self._compile(micro)
            log.info("compiling the model", mode=mode, why=why,
                     earlier_kernels=self._load_kernels())
        else:
            self.state = CompileState.off
            log.info("not compiling the model", why=why)

    def recompile(self, micro: int) -> None:
        """After an out-of-memory back-off: compile afresh, exactly as a resumed attempt will
        for this micro-batch (same mode, same stored-kernels key, so what this compile packs
        serves it); the old graphs, and any CUDA graph memory they hold, go."""
        if self.compiled is not None:
            log.info("compiling the model for the smaller micro-batch", mode=self._compile(micro))

    def step(self, run: Callable[[], T]) -> T:
        """run() one training step; the first one after compiling runs the compiler, and if
        the compiler fails, eager training goes on."""
        if self.state != CompileState.first_step:
            return run()
        try:
            self.report(phase=Phase.compiling)  # a minute on one step: say why, in status
            started, before = time.perf_counter(), cache_counts()
            out = run()
            self.report(phase=Phase.training)
            self.state = CompileState.on
            log.info("model compiled", seconds=round(time.perf_counter() - started, 1),
                     **{k: v - before[k] for k, v in cache_counts().items()})
            self._pack_kernels()
            return out
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            log.warning("torch.compile failed; training goes on without it", error=logs.brief(e))
            self.compiled, self.state = None, CompileState.off
            self.report(phase=Phase.training)
            return run()

    def take_kernels(self) -> bytes | None:
        """The packed kernels, for the next checkpoint to store (put_back if that fails)."""
        kernels, self.kernels = self.kernels, None
        return kernels

    def put_back(self, kernels: bytes | None) -> None:
        if self.kernels is None:
            self.kernels = kernels

    def _compile(self, micro: int) -> str:
        """Compile for this micro-batch (the next step runs the compiler); the mode chosen."""
        self.compiled, mode = self.compiler.compile(self.model, micro)
        self.state = CompileState.first_step
        self.key = self.compiler.key(mode, micro, self.device) if self.seal.enabled else None
        if self.key is None:
            self.seal.tell_off()
        return mode

    def _load_kernels(self) -> str:
        """The kernels an earlier attempt of this job compiled, loaded into torch's caches: a
        resumed attempt on a fresh VM then compiles from cache. Says what happened. Only kernels
        whose MAC verifies reach the loader (compiler.unpack)."""
        if self.key is None:
            return f"off ({self.seal.why_off})"
        try:
            data = self.owner.reader.read_bytes(self.kernels_path)
        except FileNotFoundError:
            return "none stored"
        started = time.perf_counter()
        try:
            blob = self.seal.verify(data, self.job_id)
        except Unverified as e:
            self._refuse(str(e))
            return f"refused: {e}"
        checked = time.perf_counter() - started
        try:
            refused = self.compiler.unpack(blob, self.key)
        except Exception as e:  # a cache problem must never cost the job: compile from scratch
            refused = logs.brief(e, 200)
        if refused:
            return f"not used: {refused}"
        self.key = None  # already stored: nothing to write back
        return f"loaded ({len(data) / 2**20:.1f} MB, MAC checked in {checked * 1000:.0f} ms)"

    def _refuse(self, why: str) -> None:
        """Kernels that do not verify: one warning naming the file, which goes (this attempt
        owns the job's files); the job compiles as without them."""
        try:
            self.owner.delete(self.kernels_path)
            deleted = True
        except Fenced:
            raise
        except Exception:  # left for this attempt's next checkpoint to overwrite
            deleted = False
        log.warning("stored compiled kernels refused, not loaded: compiling without them",
                    file=self.kernels_path, why=why, deleted=deleted)

    def _pack_kernels(self) -> None:
        """Keep what this compile produced, to be stored with the next checkpoint."""
        if self.key is None:
            return
        try:
            packed = self.compiler.pack(self.key)
            self.kernels = None if packed is None else self.seal.sign(packed, self.job_id)
        except Exception as e:
            log.warning("could not pack the compiled kernels; a resumed attempt will compile "
                        "from scratch", error=logs.brief(e, 200))
