"""Evaluation mode: what the cherry-sorting line needs to know about a trained model.

Accuracy, per-class precision / recall / F1, the confusion matrix (JSON and PNG), and how fast
the model is on this worker's device: latency at batch 1 (one cherry at a time, as on the line)
and throughput at batch 64.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch
from torch.utils.data import DataLoader

from cherry_train.jobqueue.claims import Claim
from cherry_train.jobqueue.layout import JobPaths
from cherry_train.plots import render_confusion
from cherry_train.schemas import ModelConfig, Phase, Result
from cherry_train.storage.base import Storage
from cherry_train.worker.checkpoints.state import TrainState
from cherry_train.worker.errors import JobError
from cherry_train.worker.inputs.data import loader_pool
from cherry_train.worker.inputs.datacache import cache_folder, default_cache_dir
from cherry_train.worker.inputs.loaders import (
    available_memory,
    loader_cap,
    loader_processes,
    usable_cores,
)
from cherry_train.worker.inputs.modelinput import input_normalize, with_image_size
from cherry_train.worker.inputs.prepare import local_file, source_for
from cherry_train.worker.inputs.samples import ImageFolderSamples, Transform, to_model_input
from cherry_train.worker.inputs.sources import LocalSource
from cherry_train.worker.outcome import JobRun, Outcome
from cherry_train.worker.reporting.reporter import Reporter
from cherry_train.worker.training.device import describe, pick_device, resolve_precision
from cherry_train.worker.training.export import export_checked
from cherry_train.worker.training.model import build_model, forward
from cherry_train.worker.training.weights import read_weights_file

log = structlog.get_logger(__name__)

EVAL_BATCH = 64
LATENCY_RUNS = 30
THROUGHPUT_RUNS = 10


@dataclass
class Seams:
    """The parts of evaluation a test replaces: reading the weights file, and the cores and
    RAM the loader processes are sized from."""

    read_weights: Callable[[Path], dict[str, torch.Tensor]] = read_weights_file
    cores: Callable[[], int] = usable_cores
    memory: Callable[[], int | None] = available_memory


class Evaluation:
    """The worker's Runner for mode: evaluation."""

    def __init__(self, seams: Seams | None = None):
        self.seams = seams or Seams()

    def __call__(self, run: JobRun) -> Outcome:
        return evaluate(run, self.seams)


def _source(claim: Claim, reporter: Reporter, scratch: Path, data_root: Path | None):
    """The model config and the weights file to evaluate."""
    cfg, ev = claim.manifest.config, claim.manifest.config.evaluate
    if ev.weights:
        weights = local_file(ev.weights, "evaluate.weights", data_root, reporter.owner.reader,
                             scratch)
        return cfg.model, weights, ev.weights
    storage, source = reporter.owner.reader, JobPaths(ev.job)
    raw = storage.read_text_or_none(source.result)
    if raw is None:
        raise JobError(f"evaluate.job: job {ev.job} has no result (yet) under "
                       f"{storage.description}")
    result = Result.from_json(raw)
    if result.state.value != "succeeded" or not storage.exists(source.best_weights):
        raise JobError(f"evaluate.job: job {ev.job} {result.state.value} without best weights")
    # The job's own model, so the weights fit whatever this config's model section says.
    trained = reporter.owner.manifest_of(ev.job)
    model_cfg = trained.config.model if trained else cfg.model
    local = storage.local_path(source.best_weights)
    if local is None:
        local = scratch / "best.pt"
        storage.download(source.best_weights, local)
    return model_cfg, local, f"job {ev.job} (best.pt, sha256 {result.best_weights_sha256})"


def _data_dir(claim: Claim, data_root: Path | None, storage: Storage) -> tuple[Path, dict]:
    cfg = claim.manifest.config
    raw = cfg.evaluate.data_path or cfg.data.val_path
    name = "evaluate.data_path" if cfg.evaluate.data_path else "data.val_path"
    source = source_for(raw, name, data_root, storage)
    if not source.exists():
        raise JobError(f"{name}: folder {source.label} does not exist")
    if not cfg.data.cache and isinstance(source, LocalSource):
        return source.path, {}
    report = cache_folder(source, default_cache_dir())
    return Path(report.local), {"dataset_sha256": report.sha256, "eval": report.__dict__}


def _per_class(matrix: list[list[int]], classes: list[str]) -> dict[str, dict[str, float]]:
    n = len(classes)
    out = {}
    for k, name in enumerate(classes):
        tp = matrix[k][k]
        predicted = sum(matrix[i][k] for i in range(n))
        actual = sum(matrix[k])
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[name] = {"precision": round(precision, 4), "recall": round(recall, 4),
                     "f1": round(f1, 4), "support": actual}
    return out


@torch.no_grad()
def _timings(model, device, precision, size: int, normalize) -> dict[str, float]:
    """Median latency of one image, and images per second at batch 64 (synthetic input)."""
    def timed(batch: int, runs: int) -> list[float]:
        x = to_model_input(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8),
                           device, normalize)
        times = []
        for i in range(runs + 3):  # 3 warm-up runs (cuDNN autotuning, allocator)
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            with torch.autocast(device.type, dtype=precision.dtype, enabled=precision.enabled):
                forward(model, x)
            if device.type == "cuda":
                torch.cuda.synchronize()  # the work is asynchronous until here
            if i >= 3:
                times.append(time.perf_counter() - started)
        return times

    latency = statistics.median(timed(1, LATENCY_RUNS))
    throughput = EVAL_BATCH / statistics.median(timed(EVAL_BATCH, THROUGHPUT_RUNS))
    return {"latency_ms_batch1": round(latency * 1000, 3),
            "images_per_second_batch64": round(throughput, 1)}


def evaluate(run: JobRun, seams: Seams) -> Outcome:
    """mode: evaluation: the trained job's best weights on the evaluation data."""
    claim, reporter, scratch, data_root = run.claim, run.reporter, run.scratch, run.data_root
    cfg = claim.manifest.config
    device = pick_device()
    precision = resolve_precision(cfg.amp, device)
    reporter.update(phase=Phase.copying_data, device=describe(device))
    data_dir, data_info = _data_dir(claim, data_root, reporter.owner.reader)
    model_cfg, weights_file, source = _source(claim, reporter, scratch, data_root)
    cfg = with_image_size(cfg, model_cfg.name)
    norm = input_normalize(cfg, model_cfg.name) or False
    from torchvision.datasets.folder import find_classes

    classes, _ = find_classes(str(data_dir))
    if len(classes) != model_cfg.num_classes:
        raise JobError(f"model.num_classes: the model has {model_cfg.num_classes} classes, the "
                       f"evaluation data {len(classes)}: {', '.join(classes)}")
    model = build_model(ModelConfig(name=model_cfg.name, num_classes=model_cfg.num_classes),
                        None)
    weights = seams.read_weights(weights_file)  # once: a ResNet-50's are 100 MB
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise JobError(f"evaluate: the weights do not fit {model_cfg.name} with "
                       f"{model_cfg.num_classes} classes ({str(e).splitlines()[0]})") from None
    model.to(device).eval()

    # Loader processes sized as for training: never more than the cores or the RAM allow.
    workers = loader_pool(cfg.data.num_workers, device, EVAL_BATCH, cfg.data.image_size,
                          seams.cores(), seams.memory(), loader_cap(claim.attempt.previous))
    dataset = ImageFolderSamples(data_dir, classes, Transform(cfg.data.image_size, False),
                                 cfg.seed)
    loader = DataLoader(dataset, batch_size=EVAL_BATCH,
                        sampler=[(0, i) for i in range(len(dataset))],
                        num_workers=workers, **loader_processes(workers))
    reporter.update(phase=Phase.evaluating, loader_processes=loader.num_workers)
    n = len(classes)
    matrix = [[0] * n for _ in range(n)]
    started = time.perf_counter()
    with torch.no_grad():
        for images, labels in loader:
            x = to_model_input(images, device, norm)
            with torch.autocast(device.type, dtype=precision.dtype, enabled=precision.enabled):
                predicted = forward(model, x)[0].argmax(1).cpu()
            for t, p in zip(labels.tolist(), predicted.tolist(), strict=True):
                matrix[t][p] += 1
    seconds = time.perf_counter() - started
    total = sum(map(sum, matrix))
    evaluation = {
        "model": model_cfg.name, "weights": source, "data": str(data_dir), "classes": classes,
        "images": total, "accuracy": round(sum(matrix[i][i] for i in range(n)) / total, 4),
        "per_class": _per_class(matrix, classes), "confusion_matrix": matrix,
        "device": describe(device), "amp": precision.name,
        "loader_processes": loader.num_workers,
    }
    if cfg.evaluate.latency:
        evaluation.update(_timings(model, device, precision, cfg.data.image_size,
                                   norm))
    paths = claim.paths
    export = None
    if cfg.export.onnx:  # the evaluated weights, as the line would run them
        cpu = torch.device("cpu")
        batches = (to_model_input(images, cpu, norm)
                   for images, _ in loader)
        export = {"onnx": export_checked(
            model, weights, cfg.data.image_size, batches,
            scratch / "export", reporter.owner.upload, paths.onnx, cfg.export.opset,
            cfg.export.tolerance, cfg.export.check_images)}
    reporter.owner.write(paths.evaluation, (json.dumps(evaluation, indent=2) + "\n").encode())
    reporter.owner.write(paths.confusion, render_confusion(
        matrix, classes, f"{model_cfg.name}: accuracy {evaluation['accuracy']:.3f}"))
    log.info("evaluated", job_id=claim.job_id, accuracy=evaluation["accuracy"], images=total,
             latency_ms=evaluation.get("latency_ms_batch1"),
             images_per_second=evaluation.get("images_per_second_batch64"))
    return Outcome(completed=True, state=TrainState(wall_seconds=seconds), device=describe(device),
                   precision=precision.name, threads=torch.get_num_threads(), data=data_info,
                   evaluation=evaluation, export=export)
