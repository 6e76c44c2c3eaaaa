"""mode: evaluation on a tiny model: metrics, confusion matrix, timings, and clear failures."""

from __future__ import annotations

import json

import torch
import torchvision
from PIL import Image

from cherry_train.jobqueue.claims import WorkerIdentity
from cherry_train.jobqueue.layout import JobPaths
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.jobqueue.views import job_view
from cherry_train.schemas import JobState, Result, validate_config
from cherry_train.storage import LocalStorage
from cherry_train.worker.evaluate import Evaluation, Seams
from cherry_train.worker.loop import Worker, WorkerOptions
from cherry_train.worker.training.weights import read_weights_file


def run(root, cfg: dict, evaluator: Evaluation | None = None) -> Result:
    queue = JobQueue(LocalStorage(root))
    job_id = queue.submit(validate_config(cfg)).job_id
    Worker(queue, WorkerIdentity("w"), WorkerOptions(exit_when_idle=True),
           evaluator=evaluator).run()
    return Result.from_json((root / JobPaths(job_id).result).read_bytes())


def evaluation_config(tiny_config, **evaluate) -> dict:
    return {"name": "eval", "mode": "evaluation", "model": tiny_config["model"],
            "data": {"val_path": "data/val", "image_size": 32, "num_workers": 0},
            "evaluate": evaluate, "heartbeat_seconds": 0.2, "lease_seconds": 5}


def test_evaluating_a_weights_file(root_with_data, tiny_config):
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), root_with_data / "w.pt")
    result = run(root_with_data, evaluation_config(tiny_config, weights="w.pt"))
    assert result.state == JobState.succeeded, result.error
    ev = result.evaluation
    assert ev["images"] == 32 and ev["classes"] == ["defect", "good"]
    assert sum(map(sum, ev["confusion_matrix"])) == 32
    assert 0 <= ev["accuracy"] <= 1
    for name in ("defect", "good"):
        assert set(ev["per_class"][name]) == {"precision", "recall", "f1", "support"}
        assert ev["per_class"][name]["support"] == 16
    assert ev["latency_ms_batch1"] > 0 and ev["images_per_second_batch64"] > 0
    job_dir = root_with_data / "done" / result.job_id
    assert json.loads((job_dir / "evaluation.json").read_text()) == ev
    with Image.open(job_dir / "confusion.png") as img:
        assert img.format == "PNG" and img.size == (370, 314)
    assert {"evaluation", "confusion_matrix"} <= set(result.artifacts)
    assert result.epochs is None and len(result.dataset_sha256) == 64


def test_evaluating_a_finished_job_reproduces_its_best_val_accuracy(root_with_data,
                                                                    tiny_config):
    trained = run(root_with_data, tiny_config)
    assert trained.state == JobState.succeeded
    other_model = {**tiny_config, "model": {"name": "mobilenet_v3_small", "num_classes": 2}}
    result = run(root_with_data, evaluation_config(other_model, job=trained.job_id,
                                                   latency=False))
    assert result.state == JobState.succeeded, result.error
    ev = result.evaluation
    assert ev["model"] == "resnet18"  # the job's own model, whatever this config says
    assert abs(ev["accuracy"] - trained.best.val_accuracy) <= 1 / 32
    assert trained.best_weights_sha256 in ev["weights"]
    assert "latency_ms_batch1" not in ev


def test_evaluation_reads_the_weights_once_and_sizes_its_loader_processes_as_training_does(
        root_with_data, tiny_config):
    """It read the weights file twice (evaluation, then export) and started as many loader
    processes as data.num_workers asked, whatever the cores (issue 25, item 9)."""
    from structlog.testing import capture_logs

    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), root_with_data / "w.pt")
    reads = []

    def read_weights(path):
        reads.append(path)
        return read_weights_file(path)

    cfg = evaluation_config(tiny_config, weights="w.pt", latency=False)
    cfg["data"]["num_workers"] = 2  # more than the one core this VM has, below
    seams = Seams(read_weights=read_weights, cores=lambda: 1)
    with capture_logs() as events:
        result = run(root_with_data, cfg, Evaluation(seams))
    assert result.state == JobState.succeeded, result.error
    assert "sha256" in result.export["onnx"], result.export  # the export used the weights too
    assert len(reads) == 1, reads
    (pool,) = [e for e in events if e["event"] == "loader processes"]
    assert pool["loader_processes"] == 1 and "capped at the 1 cores" in pool["why"], pool
    assert result.evaluation["loader_processes"] == 1  # what the loader was built with
    assert result.evaluation["images"] == 32


def test_weights_that_do_not_fit_fail_clearly(root_with_data, tiny_config):
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), root_with_data / "w.pt")
    result = run(root_with_data, evaluation_config(tiny_config, weights="w.pt"))
    assert result.state == JobState.failed
    assert "do not fit resnet18 with 2 classes" in result.error.message
    assert result.error.traceback is None


def test_evaluating_a_job_without_a_result_fails_clearly(root_with_data, tiny_config):
    result = run(root_with_data, evaluation_config(tiny_config, job="20261126-000000-x-0000"))
    assert result.state == JobState.failed
    assert "has no result" in result.error.message


def test_submit_resolves_a_short_evaluate_job_and_takes_its_model(root_with_data, tiny_config,
                                                                  tmp_path, capsys):
    """`evaluate.job: fce0` as `cancel` and `fetch` take it, and no `model:` section: the CLI
    stores the full id and the job's model, and the worker evaluates it."""
    import yaml

    from cherry_train.cli import main

    trained = run(root_with_data, tiny_config)
    cfg = evaluation_config(tiny_config, job=trained.job_id[-4:], latency=False)
    del cfg["model"]
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["submit", str(path), "--root", str(root_with_data)]) == 0
    job_id = capsys.readouterr().out.strip().splitlines()[-1]
    queued = job_view(JobQueue(LocalStorage(root_with_data)), job_id).manifest.config
    assert queued.evaluate.job == trained.job_id
    assert queued.model.name == "resnet18"
    Worker(JobQueue(LocalStorage(root_with_data)), WorkerIdentity("w"),
           WorkerOptions(exit_when_idle=True)).run()
    result = Result.from_json((root_with_data / JobPaths(job_id).result).read_bytes())
    assert result.state == JobState.succeeded, result.error

    for job, expected in (("zzzz", "evaluate.job: no job 'zzzz'"),
                          (job_id, "has no best weights (an evaluation itself?)")):
        cfg["evaluate"]["job"] = job
        path.write_text(yaml.safe_dump(cfg))
        assert main(["submit", str(path), "--root", str(root_with_data)]) == 2
        assert expected in capsys.readouterr().err


def test_model_may_be_left_out_only_for_a_job_evaluation(tiny_config):
    import pytest

    from cherry_train.schemas import ConfigError

    cfg = {k: v for k, v in tiny_config.items() if k != "model"}
    with pytest.raises(ConfigError, match="model: required, but missing"):
        validate_config(cfg)
