"""Training one job, resumable at any checkpoint: a few plain functions that read top to bottom.

One code path for every precision: autocast and the GradScaler are switched by `enabled=`,
never by if/else twins. Losses stay on the device and are read (a host sync) only when logged.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from torch import nn

from cherry_train import faults, logs
from cherry_train.jobqueue.owner import Fenced
from cherry_train.jobqueue.protocol import Claim
from cherry_train.jobqueue.roots import remote_location
from cherry_train.schemas import TrainingConfig
from cherry_train.worker import compiling
from cherry_train.worker.checkpoint import (
    Checkpoints,
    rng_state,
    set_rng_state,
    weights_sha256,
)
from cherry_train.worker.data import (
    Data,
    load_data,
    local_file,
    resolve_path,
    source_for,
)
from cherry_train.worker.datacache import Source, cache_folder, default_cache_dir
from cherry_train.worker.device import Precision, describe, pick_device, resolve_precision
from cherry_train.worker.errors import JobError, LoaderDied, is_cuda_error, is_loader_death
from cherry_train.worker.model import build_model, forward
from cherry_train.worker.outcome import Outcome, TrainState
from cherry_train.worker.reporting import Reporter, StopRequest

log = structlog.get_logger(__name__)

CHECKPOINT_FORMAT = 1


@dataclass
class Job:
    """Everything the training functions share, built once per attempt."""

    claim: Claim
    cfg: TrainingConfig
    device: torch.device
    precision: Precision
    data: Data
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    checkpoints: Checkpoints
    reporter: Reporter
    stop: StopRequest
    scratch: Path
    state: TrainState = field(default_factory=TrainState)
    data_info: dict[str, Any] = field(default_factory=dict)
    last_checkpoint_at: float = field(default_factory=time.perf_counter)
    attempt_started_at: float = field(default_factory=time.perf_counter)
    wall_before: float = 0.0  # wall_seconds of earlier attempts
    compiled: Any = None  # torch.compile'd model (same parameters), once decided
    compile_state: str = "undecided"  # undecided | first-step | on | off
    probe: tuple[float, int] | None = None  # (time, step) where the eager timing began
    kernels_key: dict | None = None  # what the compiled kernels are for (compiling.kernels_key)
    kernels: bytes | None = None  # packed compiled kernels, stored with the next checkpoint
    # The best epoch's weights when storing them as best.pt failed: the next checkpoint (or the
    # end of the job) stores them, so best.pt always holds the epoch the result names.
    pending_best: dict[str, torch.Tensor] | None = None
    attempt_steps: int = 0  # steps taken by this attempt
    first_step_done: bool = False
    mid_step: bool = False  # True while a step changes the model: its state is then torn

    @property
    def total_steps(self) -> int:
        return self.cfg.training.epochs * self.data.steps_per_epoch


def prepare_data(cfg: TrainingConfig, data_root: Path | None, reporter: Reporter):
    """The local folders to train from, after copying the data into the cache (unless
    data.cache is false and the data is on this machine), and what the result records."""
    d, storage = cfg.data, reporter.owner.reader

    def source(name: str) -> Source:
        return source_for(getattr(d, name), f"data.{name}", data_root, storage)

    if not d.cache and not any(remote_location(p, data_root, storage)
                               for p in (d.train_path, d.val_path)):
        return (resolve_path(d.train_path, "data.train_path", data_root),
                resolve_path(d.val_path, "data.val_path", data_root), {})
    reporter.update(phase="copying data")
    reporter.beat_now()  # minutes, on a first copy through the mount: say so in status now
    cache_dir = default_cache_dir()
    if d.archive:
        report = cache_folder(source("archive"), cache_dir)
        base = Path(report.local)
        info = {"dataset_sha256": report.sha256, "archive": asdict(report)}
        return base / d.train_path, base / d.val_path, info
    reports = {}
    for name in ("train_path", "val_path"):
        src = source(name)
        if not src.exists():
            raise JobError(f"data.{name}: folder {src.label} does not exist")
        reports[name.removesuffix("_path")] = cache_folder(src, cache_dir, pack=d.pack)
    combined = hashlib.sha256(f"{reports['train'].sha256}\n{reports['val'].sha256}".encode())
    info = {"dataset_sha256": combined.hexdigest(), **{k: asdict(r) for k, r in reports.items()}}
    return Path(reports["train"].local), Path(reports["val"].local), info


def _make_optimizer(cfg: TrainingConfig, model: nn.Module,
                    device: torch.device) -> torch.optim.Optimizer:
    t = cfg.training
    # fused (CUDA): the whole update in a few kernels; else foreach: one launch per group of
    # tensors instead of one per tensor. Both compute the same update.
    fused = cfg.performance.fused_optimizer and device.type == "cuda"
    kind = {"fused": True} if fused else {"foreach": True}
    if t.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t.learning_rate, momentum=t.momentum,
                               weight_decay=t.weight_decay, **kind)
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay, **kind)


def _make_scheduler(cfg: TrainingConfig, optimizer, total_steps: int):
    if cfg.training.lr_schedule == "cosine":
        def factor(step: int) -> float:
            return 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))
    else:
        def factor(step: int) -> float:
            return 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def setup(claim: Claim, reporter: Reporter, stop: StopRequest, scratch: Path,
          data_root: Path | None) -> Job:
    cfg = claim.manifest.config
    device = pick_device()
    if cfg.deterministic and device.type == "cuda":
        # cuBLAS is only deterministic with a fixed workspace; read when its handle is created.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(cfg.deterministic)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cuda.matmul.allow_tf32 = not cfg.deterministic
        torch.backends.cudnn.allow_tf32 = not cfg.deterministic
    # The initial weights come from the seed; later randomness is restored from checkpoints.
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    train_dir, val_dir, data_reports = prepare_data(cfg, data_root, reporter)
    data = load_data(cfg, train_dir, val_dir, device, max_workers=_loader_cap(claim))
    weights = cfg.model.pretrained
    weights_file = (local_file(weights, "model.pretrained", data_root, reporter.owner.reader,
                               scratch) if isinstance(weights, str) else None)
    model = build_model(cfg.model, weights_file).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = _make_optimizer(cfg, model, device)
    precision = resolve_precision(cfg.amp, device)
    # The fp16 GradScaler skips the optimizer step when gradients overflow (mostly the first
    # few steps). The LR schedule still follows the step count, so that is intended; torch's
    # warning about it would only alarm users.
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
    total = cfg.training.epochs * data.steps_per_epoch
    return Job(
        claim=claim, cfg=cfg, device=device, precision=precision, data=data, model=model,
        optimizer=optimizer, scheduler=_make_scheduler(cfg, optimizer, total),
        scaler=torch.amp.GradScaler(device.type, enabled=precision.needs_scaler),
        criterion=nn.CrossEntropyLoss(label_smoothing=cfg.training.label_smoothing),
        checkpoints=Checkpoints(reporter.owner, scratch, cfg.checkpoint.keep_last,
                                on_durable=_checkpoint_durable(reporter),
                                on_failed=_checkpoint_failed(reporter)),
        reporter=reporter, stop=stop, scratch=scratch, data_info=data_reports)


def _loader_cap(claim: Claim) -> int | None:
    """Half the previous attempt's loader processes when one of them died (killed for memory,
    most likely: fewer processes need less of it); else no cap."""
    previous = claim.attempt.previous
    if previous is None or previous.error is None or previous.error.type != "LoaderDied":
        return None
    return (previous.loader_processes or 0) // 2


# -- checkpoints -------------------------------------------------------------------------------

def save_checkpoint(job: Job, why: str, best: bool = False) -> None:
    """Queue a copy of the whole training state; it is written in the background. Training
    waits only for the previous checkpoint's write, if that is still going on, and for the copy
    to be queued; the GPU makes it between this step and the next. With `best`, the model's
    weights in that copy are also published as best.pt (before the checkpoint)."""
    started = time.perf_counter()
    _update_wall(job)

    def collect() -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": job.model.state_dict(),
            "optimizer": job.optimizer.state_dict(),
            "scheduler": job.scheduler.state_dict(),
            "scaler": job.scaler.state_dict(),
            "state": asdict(job.state),
            "rng": rng_state(),
            "torch_threads": torch.get_num_threads(),
        }

    kernels, job.kernels = job.kernels, None

    def before_write(payload: dict[str, Any]) -> None:
        # On the writer thread, after the previous write ended: pending_best is settled.
        pending, job.pending_best = job.pending_best, None
        try:
            job.reporter.sync_metrics()  # first: the resume from this checkpoint keeps them
            if kernels is not None:
                job.reporter.owner.write(job.claim.paths.compiled_kernels, kernels)
            if best or pending is not None:
                payload["state"]["best_weights_sha256"] = \
                    _publish_best(job, payload["model"] if best else pending)
        except Fenced:
            raise
        except Exception:  # the checkpoint fails too; what was not stored goes with the next
            if job.kernels is None:
                job.kernels = kernels
            job.pending_best = pending if not best else \
                {k: v.detach().clone() for k, v in payload["model"].items()}
            raise

    job.checkpoints.save_in_background(job.state.global_step, collect, before_write)
    job.last_checkpoint_at = time.perf_counter()
    log.info("checkpoint saved", job_id=job.claim.job_id, step=job.state.global_step, why=why,
             seconds=round(time.perf_counter() - started, 3))  # what training waited


def _drain(job: Job) -> None:
    """Let a background checkpoint write finish when training failed: its error (if any) is
    logged, and the original error is the one reported."""
    try:
        job.checkpoints.wait()
    except Exception as e:
        log.warning("background checkpoint write failed", job_id=job.claim.job_id,
                    error=f"{type(e).__name__}: {e}")


def _publish_best(job: Job, weights: dict[str, torch.Tensor]) -> str:
    job.state.best_weights_sha256 = _publish_weights(job, weights, job.claim.paths.best_weights)
    return job.state.best_weights_sha256


def _checkpoint_durable(reporter: Reporter):
    def on_durable(step: int, path: str) -> None:
        reporter.update(last_checkpoint=path, last_checkpoint_step=step, storage_error=None)
    return on_durable


def _checkpoint_failed(reporter: Reporter):
    def on_failed(step: int, error: str) -> None:
        # `cherry status` and `cherry watch` show it
        reporter.update(storage_error=f"checkpoint at step {step} not written ({error}); "
                                      "training goes on")
    return on_failed


def _update_wall(job: Job) -> None:
    job.state.wall_seconds = job.wall_before + time.perf_counter() - job.attempt_started_at


def resume(job: Job) -> None:
    found = job.checkpoints.load_latest()
    if found is None:
        job.reporter.resume_metrics(up_to_step=0)
        return
    step, payload = found
    job.checkpoints.requested_step = step
    job.model.load_state_dict(payload["model"])
    job.optimizer.load_state_dict(payload["optimizer"])
    job.scheduler.load_state_dict(payload["scheduler"])
    job.scaler.load_state_dict(payload["scaler"])
    job.state = TrainState(**payload["state"])
    job.wall_before = job.state.wall_seconds
    set_rng_state(payload["rng"])
    job.reporter.resume_metrics(up_to_step=step)
    job.reporter.update(last_checkpoint=job.claim.paths.checkpoint(step),
                        last_checkpoint_step=step)
    if payload.get("torch_threads") != torch.get_num_threads():
        log.warning("resuming with another thread count: results may differ in the last bits",
                    saved=payload.get("torch_threads"), now=torch.get_num_threads())
    log.info("resumed from checkpoint", job_id=job.claim.job_id, step=step,
             epoch=job.state.epoch, step_in_epoch=job.state.step_in_epoch)


def _checkpoint_due(job: Job) -> bool:
    every = job.cfg.checkpoint
    if every.every_steps and job.state.global_step % every.every_steps == 0:
        return True
    return time.perf_counter() - job.last_checkpoint_at >= every.every_minutes * 60


# -- one epoch ---------------------------------------------------------------------------------

def train_one_epoch(job: Job, progress_bar: bool) -> bool:
    """Train the rest of the current epoch; False if a stop was requested (after a checkpoint)."""
    loss_sum = torch.zeros((), device=job.device, dtype=torch.float64)
    correct = torch.zeros((), device=job.device, dtype=torch.int64)
    try:
        return _epoch_steps(job, progress_bar, loss_sum, correct)
    except Exception as e:
        if isinstance(e, Fenced | JobError) or job.mid_step or is_cuda_error(e):
            raise
        # Between two steps the training state is whole (a loader process died, say): keep it,
        # so the next attempt resumes from here, not from the last interval checkpoint.
        _keep_state(job, loss_sum, correct, why=f"before handing back ({type(e).__name__})")
        if job.stop.is_set():
            return False  # the stop that was asked for (its signal may have caused this)
        if _named(e) is e:
            raise
        raise _named(e) from e


def _named(error: Exception) -> Exception:
    """A dead loader process as LoaderDied (the next attempt then uses half as many); any
    other error as it is."""
    if is_loader_death(error) and not isinstance(error, LoaderDied):
        return LoaderDied(f"a data loader process died ({str(error).splitlines()[0]}); killed "
                          "for memory? The next attempt uses half as many")
    return error


def _epoch_steps(job: Job, progress_bar: bool, loss_sum: torch.Tensor,
                 correct: torch.Tensor) -> bool:
    state, cfg = job.state, job.cfg
    job.model.train()
    batches = job.data.train_batches(state.epoch, state.step_in_epoch)
    window_start, window_images = time.perf_counter(), 0
    bar = _progress(progress_bar, job, job.data.steps_per_epoch, job.state.step_in_epoch)
    step_started = time.perf_counter()
    for x, y in batches:
        job.mid_step = True
        step_loss, step_correct = train_step(job, x, y)
        loss_sum += step_loss * y.shape[0]
        correct += step_correct
        state.step_in_epoch += 1
        state.global_step += 1
        state.epoch_seen += y.shape[0]
        state.images_seen += y.shape[0]
        job.mid_step = False
        window_images += y.shape[0]
        now = time.perf_counter()
        state.train_seconds += now - step_started
        if bar is not None:
            bar.update(1)
        if not job.first_step_done:  # from set-up to the first step: decoding, loader start-up
            job.first_step_done = True
            log.info("first step", seconds=round(time.perf_counter() - job.attempt_started_at, 1))
            # Said at once (one heartbeat per attempt on this thread): an attempt that dies from
            # here on counts as a crash of training, before as a death in set-up (jobqueue).
            job.reporter.update(phase="training", trained=True, epoch=state.epoch + 1,
                                step=state.global_step)
            job.reporter.beat_now()
        faults.point("step")
        if job.compile_state == "undecided":
            _consider_compiling(job, y.shape[0])

        if state.global_step % cfg.log_every_steps == 0 or \
                state.step_in_epoch == job.data.steps_per_epoch:
            _fold_running_sums(state, loss_sum, correct)  # host sync, only here
            elapsed = time.perf_counter() - window_start
            ips = window_images / elapsed if elapsed > 0 else None
            train_loss = state.epoch_loss_sum / max(1, state.epoch_seen)
            job.reporter.metric({"kind": "train", "epoch": state.epoch + 1,
                                 "step": state.global_step,
                                 "loss": round(train_loss, 6), "lr": job.scheduler.get_last_lr()[0],
                                 "images_per_second": round(ips, 1) if ips else None})
            remaining = job.total_steps - state.global_step
            steps_per_s = state.global_step / max(state.train_seconds, 1e-9)
            job.reporter.update(phase="training", epoch=state.epoch + 1, step=state.global_step,
                                loss=train_loss,
                                accuracy=state.epoch_correct / max(1, state.epoch_seen),
                                images_per_second=ips,
                                eta_seconds=remaining / steps_per_s if steps_per_s else None)
            if bar is not None:
                bar.set_postfix(loss=f"{train_loss:.4f}", refresh=False)
            window_start, window_images = time.perf_counter(), 0
        if job.stop.is_set():
            _stop_here(job, loss_sum, correct)
            return False
        if _checkpoint_due(job) and state.step_in_epoch < job.data.steps_per_epoch:
            _fold_running_sums(state, loss_sum, correct)
            save_checkpoint(job, "interval")
        step_started = time.perf_counter()
    if bar is not None:
        bar.close()
    _fold_running_sums(state, loss_sum, correct)
    return True


def _consider_compiling(job: Job, batch: int) -> None:
    """performance.compile: decided at once where no timing is needed, else after timing a
    few eager steps (two host syncs, once per attempt)."""
    job.attempt_steps += 1
    decided = compiling.fixed_decision(job.cfg.performance.compile, job.device,
                                       job.cfg.deterministic)
    if decided is None and job.total_steps - job.state.global_step < 4 * compiling.PROBE_STEPS:
        decided = False, "too few steps left to be worth timing, let alone compiling"
    if decided is None:
        if job.attempt_steps == compiling.PROBE_SKIP:
            torch.cuda.synchronize(job.device)
            job.probe = (time.perf_counter(), job.attempt_steps)
        if job.probe is None or job.attempt_steps < job.probe[1] + compiling.PROBE_STEPS:
            return
        torch.cuda.synchronize(job.device)
        step_seconds = (time.perf_counter() - job.probe[0]) / (job.attempt_steps - job.probe[1])
        stored = compiling.kernels_enabled() and \
            job.reporter.owner.reader.exists(job.claim.paths.compiled_kernels)
        decided = compiling.pays_back(job.total_steps - job.state.global_step, step_seconds,
                                      job.state.micro_batch or batch, warm=stored)
    compile_it, why = decided
    if compile_it:
        mode = _compile(job, job.state.micro_batch or batch)
        log.info("compiling the model", mode=mode, why=why,
                 earlier_kernels=_load_kernels(job))
    else:
        job.compile_state = "off"
        log.info("not compiling the model", why=why)


def _compile(job: Job, micro: int) -> str:
    """Compile for this micro-batch (the next step runs the compiler); the mode chosen."""
    job.compiled, mode = compiling.compile_model(job.model, micro)
    job.compile_state = "first-step"
    job.kernels_key = compiling.kernels_key(mode, micro, job.device) \
        if compiling.kernels_enabled() else None
    return mode


def _load_kernels(job: Job) -> str:
    """The kernels an earlier attempt of this job compiled, loaded into torch's caches: a
    resumed attempt on a fresh VM then compiles from cache. Says what happened."""
    if job.kernels_key is None:
        return "off (CHERRY_STORED_KERNELS=0)"
    try:
        data = job.reporter.owner.reader.read_bytes(job.claim.paths.compiled_kernels)
    except FileNotFoundError:
        return "none stored"
    try:
        refused = compiling.unpack_kernels(data, job.kernels_key)
    except Exception as e:  # a cache problem must never cost the job: compile from scratch
        refused = logs.brief(e, 200)
    if refused:
        return f"not used: {refused}"
    job.kernels_key = None  # already stored: nothing to write back
    return f"loaded ({len(data) / 2**20:.1f} MB)"


def _pack_kernels(job: Job) -> None:
    """Keep what this compile produced, to be stored with the next checkpoint."""
    if job.kernels_key is None:
        return
    try:
        job.kernels = compiling.pack_kernels(job.kernels_key)
    except Exception as e:
        log.warning("could not pack the compiled kernels; a resumed attempt will compile "
                    "from scratch", error=logs.brief(e, 200))


#: Below this many images per micro-batch, an out-of-memory error fails the job.
MIN_MICRO_BATCH = 1


def train_step(job: Job, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over the batch; on CUDA out of memory, retried in smaller
    micro-batches with gradient accumulation, so the effective batch stays as configured."""
    while True:
        try:
            return _accumulated_step(job, x, y)
        except torch.OutOfMemoryError:
            _back_off(job, y.shape[0])


def _accumulated_step(job: Job, x: torch.Tensor, y: torch.Tensor):
    if job.compile_state != "first-step":
        return _step(job, x, y)
    try:  # compiling happens here; if the compiler fails, eager training goes on
        job.reporter.update(phase="compiling")  # a minute on one step: say why, in status
        started, before = time.perf_counter(), compiling.cache_counts()
        out = _step(job, x, y)
        job.reporter.update(phase="training")
        job.compile_state = "on"
        log.info("model compiled", seconds=round(time.perf_counter() - started, 1),
                 **{k: v - before[k] for k, v in compiling.cache_counts().items()})
        _pack_kernels(job)
        return out
    except torch.OutOfMemoryError:
        raise
    except Exception as e:
        log.warning("torch.compile failed; training goes on without it",
                    error=logs.brief(e))
        job.compiled, job.compile_state = None, "off"
        job.reporter.update(phase="training")
        return _step(job, x, y)


def _step(job: Job, x: torch.Tensor, y: torch.Tensor):
    amp, n = job.precision, y.shape[0]
    micro = job.state.micro_batch or n
    job.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=job.device)
    correct = torch.zeros((), device=job.device, dtype=torch.int64)
    for xs, ys in zip(x.split(micro), y.split(micro), strict=True):
        with torch.autocast(job.device.type, dtype=amp.dtype, enabled=amp.enabled):
            logits, loss = forward(job.model if job.compiled is None else job.compiled, xs, ys,
                                   job.criterion)
            # Weighted so the accumulated gradient is the whole batch's mean (x 1.0: exact).
            loss = loss * (ys.shape[0] / n)
        job.scaler.scale(loss).backward()
        loss_sum += loss.detach().float()
        correct += (logits.detach().argmax(1) == ys).sum()
    job.scaler.step(job.optimizer)
    job.scaler.update()
    job.scheduler.step()  # per step, even when the fp16 scaler skipped one (see setup)
    return loss_sum, correct


def _back_off(job: Job, batch: int) -> None:
    state = job.state
    micro = state.micro_batch or batch
    job.optimizer.zero_grad(set_to_none=True)
    if job.device.type == "cuda":
        torch.cuda.empty_cache()
    if micro <= MIN_MICRO_BATCH:
        raise JobError(f"CUDA out of memory even with micro-batches of {micro} image(s) "
                       f"({job.cfg.model.name} at {job.cfg.data.image_size} px on "
                       f"{describe(job.device)}): use a smaller data.image_size or model.name, "
                       "or a GPU with more memory") from None
    state.micro_batch = max(MIN_MICRO_BATCH, micro // 2)
    state.oom_backoffs.append({"step": state.global_step, "micro_batch": state.micro_batch})
    log.warning("CUDA out of memory: retrying the step in smaller micro-batches",
                job_id=job.claim.job_id, step=state.global_step, micro_batch=state.micro_batch,
                batch_size=batch, accumulation_steps=-(-batch // state.micro_batch))
    if job.compiled is not None:
        # Compile afresh, exactly as a resumed attempt will for this micro-batch (same mode,
        # same stored-kernels key, so what this compile packs serves it); the old graphs, and
        # any CUDA graph memory they hold, go.
        mode = _compile(job, state.micro_batch)
        log.info("compiling the model for the smaller micro-batch", mode=mode)


def _fold_running_sums(state: TrainState, loss_sum: torch.Tensor, correct: torch.Tensor) -> None:
    """Move the on-device running sums into the (checkpointed) state."""
    state.epoch_loss_sum += loss_sum.item()
    state.epoch_correct += int(correct.item())
    loss_sum.zero_()
    correct.zero_()


def _checkpoint_now(job: Job, loss_sum: torch.Tensor, correct: torch.Tensor, why: str) -> None:
    """Checkpoint the state as it is, unless the last checkpoint already holds it (right after
    an epoch, say), and wait until it is durable: the job is about to be handed back."""
    _fold_running_sums(job.state, loss_sum, correct)
    if job.checkpoints.requested_step != job.state.global_step:
        save_checkpoint(job, why)
    job.checkpoints.wait()


def _keep_state(job: Job, loss_sum: torch.Tensor, correct: torch.Tensor, why: str) -> None:
    """_checkpoint_now before the attempt ends by an error; a failure here is logged, and the
    original error goes on."""
    try:
        _checkpoint_now(job, loss_sum, correct, why)
    except Fenced:
        raise
    except Exception as e:
        log.warning("could not checkpoint before handing the job back", error=logs.brief(e))


def _stop_here(job: Job, loss_sum: torch.Tensor, correct: torch.Tensor) -> None:
    if job.stop.reason == "fenced":
        raise Fenced(f"job {job.claim.job_id}: a later attempt took over")
    _checkpoint_now(job, loss_sum, correct, f"stop ({job.stop.reason})")


def _progress(enabled: bool, job: Job, total: int, done: int):
    """The epoch's bar, from where this attempt starts in it (17/37 after a resume, not 1/20)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, unit="step", leave=False, dynamic_ncols=True,
                desc=f"epoch {job.state.epoch + 1}/{job.cfg.training.epochs}")


def _summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.float(), labels, reduction="sum")


@torch.no_grad()
def evaluate(job: Job) -> tuple[float, float]:
    """Validation loss and accuracy over the val folder (a prefix of it in development mode)."""
    job.model.eval()
    amp = job.precision
    loss_sum = torch.zeros((), device=job.device, dtype=torch.float64)
    correct = torch.zeros((), device=job.device, dtype=torch.int64)
    seen = 0
    for x, y in job.data.val_batches():
        micro = job.state.micro_batch or y.shape[0]  # what fitted in training fits here
        for xs, ys in zip(x.split(micro), y.split(micro), strict=True):
            with torch.autocast(job.device.type, dtype=amp.dtype, enabled=amp.enabled):
                logits, loss = forward(job.model, xs, ys, _summed_loss)
            loss_sum += loss
            correct += (logits.argmax(1) == ys).sum()
        seen += y.shape[0]
    return loss_sum.item() / max(1, seen), correct.item() / max(1, seen)


def end_epoch(job: Job) -> None:
    state = job.state
    job.reporter.update(phase="validating")
    val_loss, val_acc = evaluate(job)
    record = {
        "kind": "epoch", "epoch": state.epoch + 1, "step": state.global_step,
        "train_loss": state.epoch_loss_sum / max(1, state.epoch_seen),
        "train_accuracy": state.epoch_correct / max(1, state.epoch_seen),
        "val_loss": val_loss, "val_accuracy": val_acc, "lr": job.scheduler.get_last_lr()[0],
    }
    job.reporter.metric(record)
    state.last_epoch = {k: v for k, v in record.items() if k not in ("kind", "epoch", "step")}
    log.info("epoch done", job_id=job.claim.job_id, epoch=state.epoch + 1,
             epochs=job.cfg.training.epochs,
             **{k: round(v, 4) for k, v in state.last_epoch.items() if k != "lr"})
    best = state.best
    improved = best is None or (val_acc, -val_loss) > (best["val_accuracy"], -best["val_loss"])
    if improved:
        state.best = {"epoch": state.epoch + 1, "val_accuracy": val_acc, "val_loss": val_loss}
    job.reporter.update(best_val_accuracy=state.best["val_accuracy"])
    state.epoch += 1
    state.step_in_epoch = 0
    state.epoch_loss_sum, state.epoch_correct, state.epoch_seen = 0.0, 0, 0
    save_checkpoint(job, "epoch end", best=improved)  # best.pt from the same copy of the state
    job.reporter.write_curves(f"{job.claim.manifest.name} ({job.claim.job_id})")


def _publish_weights(job: Job, state_dict: dict[str, torch.Tensor], path: str) -> str:
    """Store a CPU copy of the model's weights at `path`; their hash (weights_sha256)."""
    tmp = job.scratch / (Path(path).name + ".partial")
    job.scratch.mkdir(parents=True, exist_ok=True)
    try:
        torch.save(state_dict, tmp)
        job.reporter.owner.upload(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return weights_sha256(state_dict)


# -- the whole job ----------------------------------------------------------------------------

def train(claim: Claim, reporter: Reporter, stop: StopRequest, scratch: Path,
          data_root: Path | None, progress_bar: bool = False) -> Outcome:
    job = setup(claim, reporter, stop, scratch, data_root)
    device_name = describe(job.device)
    reporter.update(device=device_name, epochs=job.cfg.training.epochs,
                    steps_per_epoch=job.data.steps_per_epoch,
                    loader_processes=job.data.num_workers)
    resume(job)
    # Where this attempt starts, in status at once, not one heartbeat interval later.
    reporter.update(phase="starting", epoch=job.state.epoch + 1, step=job.state.global_step)
    reporter.beat_now()
    log.info("training", job_id=claim.job_id, attempt=claim.attempt.n, model=job.cfg.model.name,
             device=device_name, precision=job.precision.name, epochs=job.cfg.training.epochs,
             steps_per_epoch=job.data.steps_per_epoch, batch_size=job.data.batch_size,
             num_workers=job.data.num_workers, start_epoch=job.state.epoch,
             start_step=job.state.global_step, cpu_count=os.cpu_count())
    outcome = Outcome(completed=False, state=job.state, device=device_name,
                      precision=job.precision.name, threads=torch.get_num_threads(),
                      data=job.data_info)
    try:
        while job.state.epoch < job.cfg.training.epochs:
            if stop.is_set():
                _stop_here(job, torch.zeros(()), torch.zeros((), dtype=torch.int64))
                return outcome
            if not train_one_epoch(job, progress_bar):
                return outcome
            try:
                end_epoch(job)
            except Exception as e:  # validation has loader processes too
                if job.stop.is_set() or _named(e) is e:
                    raise
                raise _named(e) from e
        job.checkpoints.wait()  # the last epoch's checkpoint is durable before the result
    except BaseException:
        _drain(job)
        raise
    finally:
        job.data.close()  # no loader process outlives its attempt
    reporter.update(phase="finishing")
    _update_wall(job)
    if job.pending_best is not None:  # its checkpoints failed: the result needs best.pt
        if _store_result(job, "best.pt", lambda: _publish_best(job, job.pending_best)) is None:
            return outcome
        job.pending_best = None
    weights = {k: v.detach().cpu() for k, v in job.model.state_dict().items()}
    outcome.final_weights_sha256 = _store_result(
        job, "final.pt", lambda: _publish_weights(job, weights, claim.paths.final_weights))
    outcome.completed = outcome.final_weights_sha256 is not None
    return outcome


#: A finished run's weights are worth waiting for: when storing them fails (Drive full, a mount
#: down past its retries), try again for up to this long, saying so in the heartbeat, before
#: the job fails. The waits double from the first, up to 2 minutes.
STORE_RESULTS_SECONDS, STORE_RESULTS_FIRST_WAIT = 600.0, 5.0


def _store_result(job: Job, name: str, store: Callable[[], str]) -> str | None:
    """store(), tried again while it fails; None if the worker is asked to stop meanwhile:
    the job is then handed back (or cancelled), not failed, and the next attempt resumes from
    the newest checkpoint — the finished state, when that one was written."""
    deadline, wait = time.monotonic() + STORE_RESULTS_SECONDS, STORE_RESULTS_FIRST_WAIT
    while True:
        try:
            stored = store()
            job.reporter.update(phase="finishing", storage_error=None)
            return stored
        except Fenced:
            raise
        except Exception as e:
            if job.stop.is_set():
                log.warning("stopped while the job's results could not be stored",
                            file=name, reason=job.stop.reason)
                return None
            if time.monotonic() + wait > deadline:
                raise
            error = logs.brief(e)
            log.error("could not store the job's results; trying again", file=name, error=error,
                      retry_in_seconds=wait)
            job.reporter.update(phase="waiting for storage", storage_error=(
                f"{name} not written ({error}); trying again for up to "
                f"{STORE_RESULTS_SECONDS / 60:.0f} minutes before the job fails"))
            job.stop.wait(wait)
            wait = min(2 * wait, 120.0)
