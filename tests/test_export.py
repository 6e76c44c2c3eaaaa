"""model.onnx: exported from the best weights, checked with onnxruntime before it is stored, and
a failed check recorded in the result instead of a model that computes something else."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

from cherry_train.jobqueue.layout import JobPaths
from cherry_train.schemas import JobState
from cherry_train.worker.training.export import (
    ParityError,
    check_parity,
    export_checked,
    export_onnx,
)

pytest.importorskip("onnxruntime")


def test_a_job_exports_its_best_weights_and_checks_them(root_with_data, tiny_config):
    import onnxruntime

    from cherry_train.checksums import file_sha256
    from tests.test_training import run_job

    tiny_config["export"] = {"onnx": True}
    result = run_job(root_with_data, tiny_config)
    onnx = result.export["onnx"]
    path = root_with_data / JobPaths(result.job_id).onnx
    assert onnx["sha256"] == file_sha256(path) == result.artifacts["onnx"].sha256
    assert onnx["opset"] == 18 and onnx["images"] == 32 and onnx["top1_agreement"] == 1.0
    assert onnx["max_abs_logit_diff"] <= onnx["tolerance"] == 1e-3
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"images": torch.zeros(5, 3, 32, 32).numpy()})[0]
    assert logits.shape == (5, 2)  # any batch size
    stored = json.loads((root_with_data / JobPaths(result.job_id).result).read_text())
    assert stored["export"]["onnx"]["sha256"] == onnx["sha256"]


def test_the_check_fails_when_the_weights_differ(tmp_path):
    torch.manual_seed(0)
    exported, other = (torchvision.models.resnet18(num_classes=2).eval() for _ in range(2))
    export_onnx(exported, 32, tmp_path / "m.onnx", 18)
    images = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    assert check_parity(exported, tmp_path / "m.onnx", images, 1e-3, 16)["images"] == 16
    with pytest.raises(ParityError, match="largest logit difference"):
        check_parity(other, tmp_path / "m.onnx", images, 1e-3, 16)


def test_a_failed_check_stores_nothing_and_says_why(tmp_path):
    model = torchvision.models.resnet18(num_classes=2)
    stored = []
    info = export_checked(model, model.state_dict(), 32, [torch.randn(4, 3, 32, 32)],
                          tmp_path / "scratch", lambda local, path: stored.append(path),
                          "done/j/model.onnx", opset=18, tolerance=1e-12, limit=4)
    assert stored == [] and info["error"].startswith("not stored: onnxruntime and PyTorch "
                                                     "disagree")
    assert not list((tmp_path / "scratch").iterdir())  # no model.onnx left behind


def test_an_evaluation_exports_the_weights_it_evaluated(root_with_data, tiny_config):
    from tests.test_evaluation import evaluation_config, run

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), root_with_data / "w.pt")
    result = run(root_with_data, evaluation_config(tiny_config, weights="w.pt", latency=False))
    assert result.state == JobState.succeeded, result.error
    onnx = result.export["onnx"]
    assert onnx["images"] == 32 and onnx["top1_agreement"] == 1.0
    assert (root_with_data / JobPaths(result.job_id).onnx).stat().st_size == onnx["bytes"]
