"""The demo, end to end on a local queue root, through the same queue and worker as real jobs."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from cherry_train.client.submit import load_config_file, submit
from cherry_train.jobqueue.claims import WorkerIdentity
from cherry_train.jobqueue.layout import JobPaths
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.schemas import JobState, Result
from cherry_train.storage import LocalStorage


@dataclass(frozen=True)
class DemoSize:
    train: int = 1200
    val: int = 400
    epochs: int = 8
    image_size: int = 48
    model: str = "resnet18"
    batch_size: int = 32


def demo_config(size: DemoSize) -> dict:
    return {
        "name": "cherry-demo",
        "seed": 0,
        "model": {"name": size.model, "num_classes": 2, "pretrained": False},
        "training": {"epochs": size.epochs, "batch_size": size.batch_size,
                     "learning_rate": 0.002, "optimizer": "adamw", "weight_decay": 0.01,
                     "lr_schedule": "cosine"},
        # Relative paths are relative to the queue root, so any worker on this root finds them.
        "data": {"train_path": "data/cherries/train", "val_path": "data/cherries/val",
                 "image_size": size.image_size, "num_workers": 0},
        "augmentation": {"enabled": True, "normalize": True, "min_crop_scale": 0.6},
        "checkpoint": {"every_minutes": 1.0, "keep_last": 2},
        "heartbeat_seconds": 5,
        "lease_seconds": 60,
    }


def ensure_dataset(root: Path, size: DemoSize, say, progress: bool = False) -> Path:
    """Generate the synthetic cherries under the root, unless this size is there already."""
    from cherry_train.demo.cherries import generate_dataset

    data = root / "data" / "cherries"
    marker = data / "dataset.json"
    wanted = {"train": size.train, "val": size.val, "image_size": 96, "seed": 0}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        say(f"dataset: reusing {data}")
        return data
    say(f"dataset: generating {size.train} + {size.val} synthetic cherry images in {data} ...")
    generate_dataset(data, train=size.train, val=size.val, size=96, seed=0, progress=progress)
    marker.write_text(json.dumps(wanted))
    return data


def run_demo(root: Path, size: DemoSize = DemoSize(), say=print, progress_bar: bool = True,
             worker_id: str = "demo-worker", cherry: str = "cherry") -> Result:
    """`cherry`: how the user runs the cherry command where they stand (the next steps use it)."""
    from cherry_train.worker.loop import Worker, WorkerOptions

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    ensure_dataset(root, size, say, progress_bar)
    config_path = root / "cherry-demo.yaml"
    config_path.write_text(yaml.safe_dump(demo_config(size), sort_keys=False))
    queue = JobQueue(LocalStorage(root))
    manifest = submit(queue, load_config_file(config_path), str(config_path))
    say(f"submitted job {manifest.job_id} ({size.model}, {size.image_size} px, "
        f"{size.epochs} epochs); the worker starts now")
    Worker(queue, WorkerIdentity(worker_id),
           WorkerOptions(exit_when_idle=True, progress_bar=progress_bar)).run()
    paths = JobPaths(manifest.job_id)
    result = Result.from_json(queue.storage.read_bytes(paths.result))
    say("")
    for line in summary(result, root, cherry, (root / paths.tensorboard).is_dir()):
        say(line)
    return result


def summary(result: Result, root: Path, cherry: str = "cherry",
            tensorboard: bool = True) -> list[str]:
    """What the demo prints at its end: the job, where its files are, what to do next.
    README's quick start shows it (tests/test_docs.py renders it and compares)."""
    job_dir = root / JobPaths(result.job_id).dir
    lines = [f"job       {result.job_id}: {result.state.value}"]
    if result.state != JobState.succeeded:
        return [*lines, f"error     {result.error.message if result.error else '?'}"]
    lines += [
        f"best      val accuracy {result.best.val_accuracy:.3f} "
        f"(epoch {result.best.epoch} of {result.epochs_completed})",
        f"speed     {result.images_per_second:.0f} images/s on {result.device}, "
        f"{result.wall_seconds:.0f} s of training",
        f"curves    {job_dir / 'curves.png'}",
        f"weights   {job_dir / 'best.pt'}",
        _onnx_line(result, job_dir)]
    if tensorboard:
        lines.append(f"events    {job_dir / 'tensorboard'}")
    lines += [f"results   {job_dir / 'result.json'}", "", "next:"]
    for command, *why in _next_steps(result, root, cherry, tensorboard):
        lines += [f"  {command}", *(f"      # {line}" for line in why)]
    return lines


def _onnx_line(result: Result, job_dir: Path) -> str:
    onnx = (result.export or {}).get("onnx") or {}
    if "sha256" not in onnx:
        return f"onnx      none: {onnx.get('error', 'not exported')}"
    return (f"onnx      {job_dir / onnx['path']} (checked against PyTorch with onnxruntime "
            f"on {onnx['images']} validation images)")


def _next_steps(result: Result, root: Path, cherry: str,
                tensorboard: bool) -> list[tuple[str, ...]]:
    """Commands, each with the lines that say why: typed as printed, they work (paths quoted:
    a macOS demo root is under "Application Support")."""
    config, root = _shell(root / "cherry-demo.yaml"), _shell(root)
    steps = [(f"{cherry} status --root {root}", "the demo's jobs (this root is its own)"),
             (f"{cherry} fetch {result.job_id[-4:]} --root {root}",
              f"its results, verified, into ./{result.job_id}")]
    if tensorboard:
        steps.append((f"{cherry} tensorboard --root {root}", "its curves in TensorBoard"))
    steps += [
        (f"{cherry} submit {config} --root YOUR_ROOT",
         "your own job: a copy of this config, with data.train_path and data.val_path at your",
         f"class folders (`{cherry} init YOUR_ROOT` remembers the root); then a worker: the",
         f"Colab notebook, or `{cherry} worker`"),
        (" ".join(["rm -r", root, *map(_shell, _cache_entries(result))]),
         "when you are done with the demo: its folder and the worker's copy of its data")]
    return steps


def _shell(path: Path | str) -> str:
    """A path as one shell word: quoted where it must be, a leading ~/ left for the shell."""
    text = str(path)
    return "~/" + shlex.quote(text[2:]) if text.startswith("~/") else shlex.quote(text)


def _cache_entries(result: Result) -> list[str]:
    """The worker's cache folders of the demo's data (one per data folder: <entry>/files)."""
    locals_ = (v.get("local") for v in result.data_cache.values() if isinstance(v, dict))
    return sorted({str(Path(local).parent) for local in locals_ if local})
