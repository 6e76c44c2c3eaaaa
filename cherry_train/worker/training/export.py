"""A model the sorting line can run: the job's best weights exported to ONNX (dynamic batch,
float32 logits) and checked before it is stored: onnxruntime on the CPU must give the same top-1
class as PyTorch on the validation images, with logits within a stated tolerance. A failed
export or check never fails the job: the result says why there is no model.onnx."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import structlog
import torch
from torch import nn

from cherry_train import logs
from cherry_train.checksums import file_sha256
from cherry_train.worker.training.job import TrainingJob
from cherry_train.worker.training.model import build_model

log = structlog.get_logger(__name__)


class ParityError(Exception):
    """The exported model does not compute what the PyTorch model computes."""


def export_onnx(model: nn.Module, image_size: int, target: Path, opset: int) -> None:
    """`model` (on the CPU, in eval mode) as an ONNX file: input `images` (N, 3, S, S) float32,
    output `logits`, N free."""
    example = torch.zeros(1, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(model, (example,), str(target), input_names=["images"],
                      output_names=["logits"], opset_version=opset, dynamo=True,
                      external_data=False, dynamic_shapes=({0: batch},), verbose=False)


def check_parity(model: nn.Module, onnx_file: Path, batches: Iterable[torch.Tensor],
                 tolerance: float, limit: int) -> dict[str, Any]:
    """Run up to `limit` images through both; ParityError if a top-1 class differs or a logit
    differs by more than `tolerance`. The figures either way."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    seen = agree = 0
    worst = 0.0
    with torch.no_grad():
        for x in batches:
            x = x[: limit - seen].float().cpu().contiguous()
            if not len(x):
                break
            expected = model(x)
            got = torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])
            worst = max(worst, (got - expected).abs().max().item())
            agree += int((got.argmax(1) == expected.argmax(1)).sum())
            seen += len(x)
            if seen >= limit:
                break
    figures = {"images": seen, "top1_agreement": agree / max(1, seen),
               "max_abs_logit_diff": worst, "tolerance": tolerance}
    if seen == 0 or agree != seen or worst > tolerance:
        raise ParityError(f"onnxruntime and PyTorch disagree on the validation images: "
                          f"top-1 agreement {agree}/{seen}, largest logit difference "
                          f"{worst:.3g} (tolerance {tolerance:g})")
    return figures


def export_checked(model: nn.Module, weights: dict[str, torch.Tensor], image_size: int,
                   batches: Iterable[torch.Tensor], scratch: Path, upload, path: str,
                   opset: int, tolerance: float, limit: int) -> dict[str, Any]:
    """Export `weights` in `model`'s shape, check it, store it at `path` through `upload`;
    what the result records under export.onnx (with `error` where it could not be done)."""
    started = time.perf_counter()
    local = scratch / "model.onnx"
    try:
        model = model.cpu().eval()
        model.load_state_dict(weights)
        scratch.mkdir(parents=True, exist_ok=True)
        export_onnx(model, image_size, local, opset)
        figures = check_parity(model, local, batches, tolerance, limit)
        upload(local, path)
        info = {"path": Path(path).name, "bytes": local.stat().st_size,
                "sha256": file_sha256(local), "opset": opset, **figures,
                "seconds": round(time.perf_counter() - started, 1)}
        log.info("model exported to ONNX and checked", **info)
        return info
    except ImportError as e:
        why = f"not exported: {e.name or 'onnx'} is not installed (pip install onnx onnxscript " \
              "onnxruntime)"
    except ParityError as e:
        why = f"not stored: {e}"
    except Exception as e:  # an op the exporter does not know, say: the job still succeeded
        why = f"not exported: {logs.brief(e, 300)}"
    finally:
        local.unlink(missing_ok=True)
    log.warning("no ONNX model for this job", why=why)
    return {"error": why, "opset": opset}


def export_best(job: TrainingJob) -> dict[str, Any]:
    """The job's best weights (best.pt, as stored), exported and checked on its validation
    images; run before its loaders close."""
    cfg, paths = job.cfg, job.claim.paths
    local = job.scratch / "export-best.pt"
    try:
        job.reporter.owner.reader.download(paths.best_weights, local)
        weights = torch.load(local, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return {"error": "not exported: the job has no best.pt", "opset": cfg.export.opset}
    finally:
        local.unlink(missing_ok=True)
    batches = (x for x, _ in job.data.val_batches())
    return export_checked(build_model(cfg.model, None), weights, cfg.data.image_size, batches,
                          job.scratch / "export", job.reporter.owner.upload, paths.onnx,
                          cfg.export.opset, cfg.export.tolerance, cfg.export.check_images)
