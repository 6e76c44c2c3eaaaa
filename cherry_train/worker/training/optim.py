"""The optimizer and the learning-rate schedule a config asks for."""

from __future__ import annotations

import math

import torch
from torch import nn

from cherry_train.schemas import TrainingConfig


def make_optimizer(cfg: TrainingConfig, model: nn.Module,
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


def make_scheduler(cfg: TrainingConfig, optimizer, total_steps: int):
    if cfg.training.lr_schedule == "cosine":
        def factor(step: int) -> float:
            return 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))
    else:
        def factor(step: int) -> float:
            return 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
