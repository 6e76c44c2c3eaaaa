"""timm models by `model.name: timm/<name>`: trained and resumed like torchvision's, their own
input size with `data.image_size: auto`, a weights file loaded, and clear words without timm."""

from __future__ import annotations

import sys

import pytest
import torch

from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.schemas import ConfigError, JobState, ModelConfig, validate_config
from cherry_train.storage import LocalStorage
from cherry_train.worker.errors import JobError
from cherry_train.worker.inputs.modelinput import (
    default_image_size,
    input_normalize,
    with_image_size,
)
from cherry_train.worker.inputs.samples import Normalize
from cherry_train.worker.training.model import build_model, check_model_name

timm = pytest.importorskip("timm")
SMALL = "timm/resnet10t"  # 4.9 M parameters: a CPU trains it in seconds at 32 px


def test_a_timm_model_trains_and_resumes(root_with_data, tiny_config):
    from tests.test_training import finish

    tiny_config["model"] = {"name": SMALL, "num_classes": 2}
    queue = JobQueue(LocalStorage(root_with_data))
    job_id = queue.submit(validate_config(tiny_config)).job_id
    assert finish(queue, job_id, stop_at_step=3) is None  # handed back after a checkpoint
    result = finish(queue, job_id)
    assert result.state == JobState.succeeded and result.attempts == 2
    assert result.steps_completed == 12


def test_names_are_checked_against_timm_with_a_suggestion():
    check_model_name("timm/convnext_tiny")
    with pytest.raises(JobError, match=r"did you mean timm/convnext_tiny"):
        check_model_name("timm/convnxt_tiny")
    with pytest.raises(ConfigError, match="timm/<name>"):
        validate_config({"model": {"name": "timm/ConvNext", "num_classes": 2},
                         "training": {"epochs": 1, "batch_size": 2, "learning_rate": 0.1},
                         "data": {"train_path": "a", "val_path": "b"}})


def test_without_timm_the_error_says_how_to_install_it(monkeypatch, tiny_config):
    from cherry_train.client.submit import check_model_name as client_check

    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(JobError, match=r"pip install 'cherry-train\[timm\]'"):
        build_model(ModelConfig(name=SMALL, num_classes=2), None)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None if name == "timm"
                        else object())
    config = validate_config({**tiny_config, "model": {"name": SMALL, "num_classes": 2}})
    assert "pip install 'cherry-train[timm]'" in client_check(config)


def test_image_size_auto_and_normalisation_are_the_models_own(tiny_config):
    assert default_image_size("timm/efficientnet_b3") == 288
    assert default_image_size("resnet50") == 224 and default_image_size("inception_v3") == 299
    cfg = validate_config({**tiny_config, "model": {"name": "timm/efficientnet_b3",
                                                    "num_classes": 2},
                           "data": {**tiny_config["data"], "image_size": "auto"}})
    assert with_image_size(cfg).data.image_size == 288
    vit_name = "timm/vit_base_patch16_224.augreg_in21k"
    vit = validate_config({**tiny_config, "model": {"name": vit_name, "num_classes": 2}})
    assert input_normalize(vit) == Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # its own
    assert input_normalize(cfg) == Normalize()  # ImageNet's, as timm's efficientnet_b3 says
    with pytest.raises(ConfigError, match="data.image_size: Input should be greater than or "
                       r"equal to 16 \(pixels\), or auto \(got 8\)"):
        validate_config({**tiny_config, "data": {**tiny_config["data"], "image_size": 8}})


def test_a_weights_file_is_loaded_into_a_timm_model(tmp_path):
    source = timm.create_model("resnet10t", num_classes=2)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    model = build_model(ModelConfig(name=SMALL, num_classes=2, pretrained=str(tmp_path / "w.pt")),
                        tmp_path / "w.pt")
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
