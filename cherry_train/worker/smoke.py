"""The pre-flight smoke test: a couple of real training steps on the CPU, before a job is
queued, so a model that cannot run at the configured size fails on the laptop, not on Colab."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from cherry_train.schemas import TrainingConfig
from cherry_train.worker.errors import JobError
from cherry_train.worker.inputs.modelinput import input_normalize, with_image_size
from cherry_train.worker.inputs.samples import ImageFolderSamples, Transform, to_model_input
from cherry_train.worker.training.model import build_model, forward

SMOKE_STEPS = 2
SMOKE_BATCH = 2


def smoke_test(cfg: TrainingConfig, train_dir: Path, classes: list[str],
               weights_file: Path | None) -> str:
    """Run SMOKE_STEPS optimizer steps on a few training images; return a one-line summary."""
    started = time.perf_counter()
    cfg = with_image_size(cfg)
    # Never download here: torchvision's weights are the worker's business; a weights file is
    # loaded, since a wrong one is worth finding now.
    model_cfg = cfg.model.model_copy(update={"pretrained": bool(weights_file)})
    model = build_model(model_cfg, weights_file)
    model.train()
    data = ImageFolderSamples(train_dir, classes, Transform(cfg.data.image_size,
                                                            cfg.augmentation.enabled,
                                                            cfg.augmentation.min_crop_scale),
                              cfg.seed)
    n = len(data)
    picks = [(0, i * n // SMOKE_BATCH) for i in range(SMOKE_BATCH)]
    images = torch.stack([data[p][0] for p in picks])
    labels = torch.tensor([data[p][1] for p in picks])
    x = to_model_input(images, torch.device("cpu"), input_normalize(cfg) or False)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    try:
        for _ in range(SMOKE_STEPS):
            _, loss = forward(model, x, labels)  # the worker's own forward pass and loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    except (RuntimeError, AssertionError, ValueError) as e:
        # Shapes: the image size does not suit the architecture (a layer's RuntimeError, ViT's
        # AssertionError "Wrong image height!", a pooling ValueError).
        raise JobError(f"data.image_size: {cfg.model.name} cannot train at "
                       f"{cfg.data.image_size} px ({(str(e) or type(e).__name__).splitlines()[0]})"
                       ) from None
    seconds = time.perf_counter() - started
    return (f"{SMOKE_STEPS} training steps of {cfg.model.name} at {cfg.data.image_size} px on "
            f"the CPU: loss {loss.item():.3f} ({seconds:.1f} s)")
