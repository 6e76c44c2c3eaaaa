"""Weights from a file or from torchvision: a state dict read (bare or wrapped the usual ways)
and loaded into a model where its tensors fit."""

from __future__ import annotations

from pathlib import Path

import structlog
import torch
import torchvision
from torch import nn

from cherry_train.worker.errors import JobError

log = structlog.get_logger(__name__)


def torchvision_weights(name: str) -> dict[str, torch.Tensor]:
    try:
        return torchvision.models.get_model_weights(name).DEFAULT.get_state_dict(progress=False)
    except Exception as e:  # urllib/HTTP/SSL errors vary by platform; all mean "no weights"
        raise JobError(f"model.pretrained: could not download torchvision's weights for {name} "
                       f"({type(e).__name__}: {e}); on a machine without internet, set "
                       "model.pretrained to the path of a weights file") from None


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise JobError(f"model.pretrained: weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise JobError(f"model.pretrained: {path} is not a readable torch weights file "
                       f"({type(e).__name__}: {e})") from None
    # Accept a bare state dict, or one wrapped the usual ways (our checkpoints, Lightning).
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise JobError(f"model.pretrained: {path} holds no state dict")
    return state


def load_matching(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    # Checkpoints of a torch.compile'd model prefix every key with "_orig_mod.".
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    usable = {k: v for k, v in state.items()
              if k in own and isinstance(v, torch.Tensor) and v.shape == own[k].shape}
    if not usable:
        raise JobError(f"model.pretrained: no tensor in {source} fits {type(model).__name__}; "
                       "is it the weights of another architecture?")
    model.load_state_dict(usable, strict=False)
    skipped = sorted(set(own) - set(usable))
    log.info("weights loaded", source=source, tensors=len(usable), left_initialised=skipped[:8],
             left_initialised_count=len(skipped))
