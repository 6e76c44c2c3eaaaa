"""Will a job's files fit in the queue root? Its footprint (checkpoints kept, best and final
weights, the ONNX export) against the root's free space, before a job starts, so a full Drive is
said at once instead of after an hour of training that cannot be stored."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import structlog

from cherry_train import logs
from cherry_train.jobqueue.layout import JobPaths
from cherry_train.schemas import Manifest, Mode, TrainingConfig
from cherry_train.sizes import human_bytes
from cherry_train.storage.base import Storage

log = structlog.get_logger(__name__)

BYTES_PER_PARAMETER = 4  # checkpoints and weights are stored in float32
#: Tensors of optimizer state per weight: Adam's two moments; SGD's momentum (none without).
OPTIMIZER_STATE = {"adam": 2, "adamw": 2, "sgd": 1}
#: A job found not to fit is looked at again after this long (space may have been freed).
RECHECK_SECONDS = 300.0
#: The free space read is reused this long (on a Drive API root each read is a request).
FREE_FRESH_SECONDS = 60.0


@functools.lru_cache(maxsize=32)
def parameter_count(name: str, num_classes: int) -> int:
    """The model's parameters, counted on the meta device (no memory, no weights download).
    Needs torch; raises ImportError without it."""
    import torch

    from cherry_train.schemas.config import ModelConfig
    from cherry_train.worker.training.model import build_model

    with torch.device("meta"):
        model = build_model(ModelConfig(name=name, num_classes=num_classes), None)
    return sum(p.numel() for p in model.parameters())


def footprint(config: TrainingConfig) -> int | None:
    """The most a training job stores: `keep_last` checkpoints, the best one and the one being
    written before the oldest goes, each the weights plus the optimizer's state; best.pt and
    final.pt; model.onnx. None for what stores little (an evaluation) or a model torch cannot
    build here."""
    if config.mode == Mode.evaluation or config.model is None or config.training is None:
        return None
    try:
        weights = parameter_count(config.model.name, config.model.num_classes) * \
            BYTES_PER_PARAMETER
    except ImportError:
        raise
    except Exception as e:  # an unknown or timm model missing here: the worker says so later
        log.debug("model not counted; its footprint is not checked", error=logs.brief(e))
        return None
    training = config.training
    state = OPTIMIZER_STATE[training.optimizer] if training.optimizer != "sgd" or \
        training.momentum > 0 else 0
    checkpoint = weights * (1 + state)
    return (config.checkpoint.keep_last + 2) * checkpoint + 2 * weights + \
        (weights if config.export.onnx else 0)


def shortfall(need: int | None, free: int | None) -> str | None:
    """Why the job does not fit, in words; None if it does or either is unknown."""
    if need is None or free is None or need <= free:
        return None
    return (f"needs about {human_bytes(need)} (checkpoints, weights, ONNX) but the root has "
            f"{human_bytes(free)} free; free space there (on Drive, empty the trash too) or "
            "lower checkpoint.keep_last")


class SpaceGate:
    """The worker's check before it claims a job. A job that does not fit is left in the queue
    (no attempt is made, so it is never counted towards a crash loop), said once, and not
    looked at again for RECHECK_SECONDS: the worker does not spin on it."""

    def __init__(self, storage: Storage, monotonic: Callable[[], float] = time.monotonic):
        self.storage, self.monotonic = storage, monotonic
        self._not_before: dict[str, float] = {}
        self._free: tuple[float, int | None] | None = None

    def refuses(self, manifest: Manifest) -> bool:
        now = self.monotonic()
        if now < self._not_before.get(manifest.job_id, 0.0):
            return True
        need = footprint(manifest.config)
        if need is None:
            return False
        why = shortfall(need - self._stored(manifest.job_id, need), self.free(now))
        if why is None:
            return False
        self._not_before[manifest.job_id] = now + RECHECK_SECONDS
        log.warning("not starting a job that would not fit in the queue root; it stays queued "
                    "and is looked at again later", job_id=manifest.job_id, problem=why,
                    retry_in_minutes=RECHECK_SECONDS / 60)
        return True

    def free(self, now: float) -> int | None:
        if self._free is None or now - self._free[0] >= FREE_FRESH_SECONDS:
            try:
                free = self.storage.free_bytes()
            except Exception as e:  # unknown space never stops a job
                log.warning("could not read the root's free space", error=logs.brief(e))
                free = None
            self._free = (now, free)
        return self._free[1]

    def _stored(self, job_id: str, need: int) -> int:
        """What a resumed job already stores (its checkpoints), counted in its footprint; read
        only when the job looks too large, never more than the footprint."""
        if self.free(self.monotonic()) is None or need <= (self._free[1] or 0):
            return 0
        try:
            entries = self.storage.list_entries(JobPaths(job_id).checkpoints_dir)
        except OSError:
            return 0
        return min(need, sum(i.size for i in entries.values() if not i.is_dir))
