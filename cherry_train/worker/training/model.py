"""Classification models by name: torchvision's (`resnet50`) or timm's (`timm/convnext_tiny`,
needs the `timm` extra), with their own pretrained weights or a weights file (weights.py), and
the one forward pass and loss every caller shares."""

from __future__ import annotations

import difflib
from pathlib import Path

import structlog
import torch
import torchvision
from torch import nn

from cherry_train.schemas import ModelConfig
from cherry_train.worker.errors import JobError
from cherry_train.worker.inputs.modelinput import TIMM, timm_module
from cherry_train.worker.training.weights import (
    load_matching,
    read_weights_file,
    torchvision_weights,
)

log = structlog.get_logger(__name__)


def forward(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None,
            loss=nn.functional.cross_entropy) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The class scores for a batch and, given labels, the loss: the one forward pass of
    training, validation, evaluation and pre-flight, so they cannot disagree about a model.
    googlenet and inception_v3 return their auxiliary heads' scores too while training: the
    main head's are the ones trained and judged."""
    out = model(x)
    logits = out.logits if hasattr(out, "logits") else out
    return logits, (loss(logits, y) if y is not None else None)


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss summed over a batch, in float32 (validation adds batches up, then divides)."""
    return nn.functional.cross_entropy(logits.float(), labels, reduction="sum")


def classification_models() -> list[str]:
    # Only the top-level module: no detection/segmentation/video models.
    return torchvision.models.list_models(module=torchvision.models)


def check_model_name(name: str) -> None:
    if name.startswith(TIMM):
        timm, wanted = timm_module(), name.removeprefix(TIMM)
        if timm.is_model(wanted.split(".")[0]):
            return
        close = difflib.get_close_matches(wanted, timm.list_models(), n=3)
        hint = f"; did you mean {' or '.join(TIMM + c for c in close)}?" if close else ""
        raise JobError(f"model.name: {wanted!r} is not a timm model{hint} (timm.list_models() "
                       "lists them)")
    known = classification_models()
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise JobError(f"model.name: {name!r} is not a torchvision classification model{hint} "
                   f"(available: {', '.join(known)})")


#: Auxiliary classifier heads (googlenet, inception_v3) only add a training loss that is not
#: used here, and inception_v3's needs 299 px to run at all in training: built without them,
#: it trains from its documented 75 px. Their pretrained weights load the same (the heads'
#: tensors are left out).
AUX_HEADS_OFF = {"googlenet": {"aux_logits": False}, "inception_v3": {"aux_logits": False}}


def build_model(cfg: ModelConfig, weights_file: Path | None) -> nn.Module:
    """The model with `num_classes` outputs, its weights loaded as `pretrained` says.

    One path for both kinds of weights: build the model for our class count, then load every
    tensor whose shape matches. Only the classifier head differs, so it stays freshly initialised
    whatever attribute the architecture keeps it in (fc, classifier[-1], heads.head, ...). timm
    loads its own pretrained weights the same way (its head left new for our classes)."""
    check_model_name(cfg.name)
    if cfg.name.startswith(TIMM):
        model = timm_module().create_model(cfg.name.removeprefix(TIMM),
                                     pretrained=cfg.pretrained is True,
                                     num_classes=cfg.num_classes)
    else:
        model = torchvision.models.get_model(cfg.name, weights=None, num_classes=cfg.num_classes,
                                             **AUX_HEADS_OFF.get(cfg.name, {}))
        if cfg.pretrained is True:
            load_matching(model, torchvision_weights(cfg.name),
                          source="torchvision DEFAULT weights")
    if weights_file is not None and cfg.pretrained is not True:
        load_matching(model, read_weights_file(weights_file), source=str(weights_file))
    return model
