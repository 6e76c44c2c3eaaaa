"""One optimizer step, and what keeps it running: on CUDA out of memory the step is retried in
smaller micro-batches with gradient accumulation, so the effective batch stays as configured.

One code path for every precision: autocast and the GradScaler are switched by `enabled=`,
never by if/else twins. Losses stay on the device and are read (a host sync) only when logged.
"""

from __future__ import annotations

import structlog
import torch

from cherry_train.worker.errors import JobError
from cherry_train.worker.training.device import describe
from cherry_train.worker.training.job import TrainingJob
from cherry_train.worker.training.model import forward

log = structlog.get_logger(__name__)

#: Below this many images per micro-batch, an out-of-memory error fails the job.
MIN_MICRO_BATCH = 1


def train_step(job: TrainingJob, x: torch.Tensor,
               y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over the batch: its (batch-mean loss, correct count), on the device."""
    while True:
        try:
            return job.compilation.step(lambda: _step(job, x, y))
        except torch.OutOfMemoryError:
            if job.group is not None:  # one rank alone must not back off
                raise JobError(f"CUDA out of memory at {y.shape[0]} images per GPU over "
                               f"{job.group.ranks} GPUs: use a smaller training.batch_size "
                               "(the global batch)") from None
            _back_off(job, y.shape[0])


def _step(job: TrainingJob, x: torch.Tensor, y: torch.Tensor):
    amp, n = job.precision, y.shape[0]
    micro = job.state.micro_batch or n
    model = job.compilation.model_for_step()
    job.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=job.device)
    correct = torch.zeros((), device=job.device, dtype=torch.int64)
    for xs, ys in zip(x.split(micro), y.split(micro), strict=True):
        with torch.autocast(job.device.type, dtype=amp.dtype, enabled=amp.enabled):
            logits, loss = forward(model, xs, ys, job.criterion)
            # Weighted so the accumulated gradient is the whole batch's mean (x 1.0: exact).
            loss = loss * (ys.shape[0] / n)
        job.scaler.scale(loss).backward()
        loss_sum += loss.detach().float()
        correct += (logits.detach().argmax(1) == ys).sum()
    job.scaler.step(job.optimizer)
    job.scaler.update()
    job.scheduler.step()  # per step, even when the fp16 scaler skipped one (see train.setup)
    return loss_sum, correct


def _back_off(job: TrainingJob, batch: int) -> None:
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
    job.compilation.recompile(state.micro_batch)
