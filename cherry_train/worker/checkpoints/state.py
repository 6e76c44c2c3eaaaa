"""Where training stands beyond the tensors (`TrainState`): saved in every checkpoint and
restored from it, and handed back in an attempt's Outcome."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainState:
    """Where training stands, beyond the tensors: restored from every checkpoint."""

    epoch: int = 0  # the epoch in progress (0-based); == epochs when training is done
    step_in_epoch: int = 0
    global_step: int = 0
    epoch_loss_sum: float = 0.0
    epoch_correct: int = 0
    epoch_seen: int = 0
    best: dict[str, Any] | None = None  # epoch, val_accuracy, val_loss
    best_weights_sha256: str | None = None
    train_seconds: float = 0.0  # over all attempts, training steps only
    wall_seconds: float = 0.0  # over all attempts, everything from setup to the last epoch
    images_seen: int = 0
    last_epoch: dict[str, float] = field(default_factory=dict)
    micro_batch: int = 0  # 0: the whole batch at once; else gradient accumulation (after OOM)
    oom_backoffs: list[dict[str, int]] = field(default_factory=list)
    ranks: int = 1  # how many processes trained it when this state was saved (--gpus)
    rank_changes: list[dict[str, int]] = field(default_factory=list)  # step, from, to
