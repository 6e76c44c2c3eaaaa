"""What a model expects of its input: the image size it was made for (data.image_size: auto)
and the normalisation its weights were trained with. timm's pretrained configs say for timm
models; the input pipeline asks here, never the model module."""

from __future__ import annotations

import structlog

from cherry_train.schemas import TrainingConfig
from cherry_train.worker.errors import JobError
from cherry_train.worker.inputs.samples import Normalize

log = structlog.get_logger(__name__)


TIMM = "timm/"
TIMM_INSTALL = "pip install 'cherry-train[timm]' (on Colab: in the notebook's install cell)"


def timm_module():
    try:
        import timm
    except ImportError:
        raise JobError(f"model.name: timm models need timm here: {TIMM_INSTALL}") from None
    return timm


def default_image_size(name: str) -> int:
    """The input size a model was made for: timm's pretrained config says; torchvision's models
    take 224 (inception_v3: 299)."""
    if name.startswith(TIMM):
        config = timm_module().get_pretrained_cfg(name.removeprefix(TIMM))
        return int(config.input_size[-1]) if config is not None else 224
    return 299 if name == "inception_v3" else 224


def input_normalize(cfg: TrainingConfig, model_name: str | None = None) -> Normalize | None:
    """augmentation.normalize for this model: timm's pretrained mean and std, ImageNet's for
    torchvision's, or none."""
    if not cfg.augmentation.normalize:
        return None
    name = model_name or cfg.model.name
    if name.startswith(TIMM):
        config = timm_module().get_pretrained_cfg(name.removeprefix(TIMM))
        if config is not None and config.mean and config.std:
            return Normalize(tuple(config.mean), tuple(config.std))
    return Normalize()


def with_image_size(cfg: TrainingConfig, model_name: str | None = None) -> TrainingConfig:
    """The config with data.image_size: auto replaced by the model's own input size."""
    if cfg.data.image_size != "auto":
        return cfg
    name = model_name or cfg.model.name
    size = default_image_size(name)
    log.info("data.image_size: auto", image_size=size, model=name)
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"image_size": size})})
