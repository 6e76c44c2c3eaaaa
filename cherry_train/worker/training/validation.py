"""Validation over the val folder (a prefix of it in development mode): the loss and accuracy
each epoch ends with. Over several ranks each validates its share of the images with rank 0's
BatchNorm statistics, and the sums are added up, so every rank has the whole set's figures."""

from __future__ import annotations

import torch

from cherry_train.worker.training.job import TrainingJob
from cherry_train.worker.training.model import forward, summed_cross_entropy


@torch.no_grad()
def validate(job: TrainingJob) -> tuple[float, float]:
    """Validation loss and accuracy (means over the images)."""
    job.model.eval()
    if job.group is not None:
        job.group.sync_buffers(job.model)
    amp = job.precision
    loss_sum = torch.zeros((), device=job.device, dtype=torch.float64)
    correct = torch.zeros((), device=job.device, dtype=torch.int64)
    seen = 0
    for x, y in job.data.val_batches():
        micro = job.state.micro_batch or y.shape[0]  # what fitted in training fits here
        for xs, ys in zip(x.split(micro), y.split(micro), strict=True):
            with torch.autocast(job.device.type, dtype=amp.dtype, enabled=amp.enabled):
                logits, loss = forward(job.model, xs, ys, summed_cross_entropy)
            loss_sum += loss
            correct += (logits.argmax(1) == ys).sum()
        seen += y.shape[0]
    if job.group is not None:
        sums = job.group.sum(torch.stack([loss_sum, correct.double(),
                                          torch.tensor(float(seen), device=job.device,
                                                       dtype=torch.float64)]))
        loss_sum, correct, seen = sums[0], sums[1], int(sums[2].item())
    return loss_sum.item() / max(1, seen), correct.item() / max(1, seen)
