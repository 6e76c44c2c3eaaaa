"""Training throughput on a GPU: cherry-train against the seed recipe and the hardware ceiling,
in one run on one card (ResNet-50, 224 px, 2 classes, Adam).

    python benchmarks/train_throughput.py [--images 20000] [--out DIR]

Cases:
- seed recipe, batch 32: torchvision ImageFolder + DataLoader(num_workers=min(8, cores),
  pin_memory=True), RandomResizedCrop + flip, fp16 torch.amp.autocast + GradScaler, as in the
  seed skill. Steady state: steps after a warm-up, timed with the GPU synchronised.
- cherry-train, batch 32 and 256: a real job through the real worker; its images/s after the
  first epoch, from its own metrics (the first epoch is reported apart).
- synthetic ceiling, batch 256: cherry-train's model set-up (bf16, channels_last) on random
  data already on the GPU: what the input pipeline could at best reach.
- checkpoint: the time a ResNet-50 + Adam checkpoint takes out of training.
The JPEG set is generated first (smooth random photos, 500x375, like the issue's set).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn

#: Warm-up steps: enough to drain what a loader prefetched while the model was set up (the seed
#: recipe's 8 workers x 2 batches), which would otherwise flatter an input-bound pipeline.
WARMUP = 50
#: Then three windows of 100 steps; the median window counts.
WINDOWS, WINDOW = 3, 100


def _photo(args) -> None:
    """A smooth random photo with sensor-like noise: 500x375 is ~58 KB, 1600x1200 ~0.6 MB."""
    path, seed, *size = args
    width, height = size[0] if size else (500, 375)
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)  # low-frequency content
    img = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    noise = rng.integers(-12, 13, (height, width, 3))
    noisy = np.clip(np.asarray(img, np.int16) + noise, 0, 255)
    Image.fromarray(noisy.astype(np.uint8)).save(path, quality=90)


def make_dataset(root: Path, images: int, size: tuple[int, int] = (500, 375)) -> Path:
    """`images` train photos (and a val split) of `size` (1600x1200: a phone's or a sorting
    line camera's), two classes."""
    jobs = []
    for split, count in (("train", images), ("val", max(64, images // 20))):
        for cls in ("defect", "good"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
        jobs += [(root / split / ("defect", "good")[i % 2] / f"{i:06d}.jpg",
                  i + (0 if split == "train" else 10**7), size) for i in range(count)]
    with Pool(os.cpu_count()) as pool:
        pool.map(_photo, jobs, chunksize=64)
    return root


def _timed_steps(step, batches) -> float:
    """Images per second: the median of WINDOWS windows after WARMUP steps, the GPU
    synchronised at each window's ends."""
    it = iter(batches)
    for _ in range(WARMUP):
        step(*next(it))
    rates = []
    for _ in range(WINDOWS):
        torch.cuda.synchronize()
        started, seen = time.perf_counter(), 0
        for _ in range(WINDOW):
            x, y = next(it)
            step(x, y)
            seen += y.shape[0]
        torch.cuda.synchronize()
        rates.append(seen / (time.perf_counter() - started))
    print("  windows: " + ", ".join(f"{r:.0f}" for r in rates) + " images/s", flush=True)
    return statistics.median(rates)


def seed_recipe(data: Path, batch: int) -> float:
    from torchvision import transforms

    t = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                            transforms.ToTensor()])
    loader = torch.utils.data.DataLoader(
        torchvision.datasets.ImageFolder(data / "train", t), batch_size=batch, shuffle=True,
        num_workers=min(8, os.cpu_count() or 1), pin_memory=True, drop_last=True,
        persistent_workers=True)
    model = torchvision.models.resnet50(num_classes=2).cuda()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    scaler = torch.amp.GradScaler("cuda")

    def step(x, y):
        x, y = x.cuda(non_blocking=True), y.cuda(non_blocking=True)
        with torch.amp.autocast("cuda", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def forever():
        while True:
            yield from loader
    return _timed_steps(step, forever())


def ceiling_step(compiled: bool):
    """A training step with cherry-train's model set-up (bf16, channels_last; compiled: also
    fused Adam and torch.compile), on whatever batch it is given."""
    model = torchvision.models.resnet50(num_classes=2).cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), 1e-3, fused=compiled)
    forward = torch.compile(model) if compiled else model

    def step(x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()
    return step


def synthetic_ceiling(batch: int, compiled: bool = False) -> float:
    x = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,), device="cuda")
    return _timed_steps(ceiling_step(compiled), iter(lambda: (x, y), None))


def cherry_train(root: Path, batch: int, epochs: int, performance: dict | None = None,
                 trainer=None) -> dict:
    """A real job through the real worker; steady images/s from its metrics after epoch 1.
    `trainer`: a train.Training with seams (a probe around the step), else the default."""
    from cherry_train.jobqueue.claims import WorkerIdentity
    from cherry_train.jobqueue.lifecycle import JobQueue
    from cherry_train.schemas import Result, validate_config
    from cherry_train.storage import LocalStorage
    from cherry_train.worker.loop import Worker, WorkerOptions

    queue = JobQueue(LocalStorage(root))
    cfg = {"name": f"bench-{batch}", "model": {"name": "resnet50", "num_classes": 2},
           "training": {"epochs": epochs, "batch_size": batch, "learning_rate": 0.001},
           "data": {"train_path": "data/train", "val_path": "data/val", "image_size": 224},
           "checkpoint": {"every_minutes": 60}, "log_every_steps": 10,
           "performance": performance or {}}
    job_id = queue.submit(validate_config(cfg)).job_id
    started = time.perf_counter()
    Worker(queue, WorkerIdentity("bench"), WorkerOptions(exit_when_idle=True),
           trainer=trainer).run()
    wall = time.perf_counter() - started
    job = root / "done" / job_id
    result = Result.from_json((job / "result.json").read_bytes())
    lines = [json.loads(x) for x in (job / "metrics.jsonl").read_text().splitlines()]
    steady = [x["images_per_second"] for x in lines
              if x["kind"] == "train" and x["epoch"] >= 2 and x["images_per_second"]]
    first = [x["images_per_second"] for x in lines
             if x["kind"] == "train" and x["epoch"] == 1 and x["images_per_second"]]
    log = [json.loads(x) for x in (job / "worker.log").read_text().splitlines()] \
        if (job / "worker.log").exists() else []
    ckpt = [x["seconds"] for x in log if x.get("event") == "checkpoint saved"]
    events = {x.get("event"): x for x in log}
    windows: dict[int, list[float]] = {}  # epoch -> images/s of each 10-step window
    for x in lines:
        if x["kind"] == "train" and x["images_per_second"]:
            windows.setdefault(x["epoch"], []).append(x["images_per_second"])
    last = max(windows) if len(windows) > 1 else None
    return {"steady": statistics.median(steady) if steady else None,
            "last_epoch": statistics.median(windows[last]) if last is not None else None,
            "first_step_s": events.get("first step", {}).get("seconds"),
            "decode_s": events.get("images decoded into memory", {}).get("seconds"),
            "compile_s": events.get("model compiled", {}).get("seconds"),
            "compile_mode": events.get("compiling the model", {}).get("mode"),
            "first_epoch": statistics.median(first) if first else None,
            "state": result.state.value, "wall_seconds": round(wall, 1),
            "amp": result.amp, "checkpoint_seconds": statistics.median(ckpt) if ckpt else None,
            "windows": windows, "checkpoints_s": ckpt}


#: Each technique measured on its own, in one run.
VARIANTS = {
    "loader workers": {"input_pipeline": "workers", "compile": "off", "fused_optimizer": False},
    "gpu pipeline": {"input_pipeline": "gpu", "compile": "off", "fused_optimizer": False},
    "gpu pipeline + fused": {"input_pipeline": "gpu", "compile": "off"},
    "gpu pipeline + fused + compile": {"input_pipeline": "gpu", "compile": "on"},
    "gpu pipeline + fused + compile, CUDA graphs at any batch": {
        "input_pipeline": "gpu", "compile": "on", "cuda_graphs": True},
}


def run_variants(root: Path, batches: list[int], wanted: list[str], figures: dict,
                 jobs: dict) -> None:
    """A real job per batch size and wanted variant; its figures into `figures`."""
    for batch in batches:
        for name, performance in VARIANTS.items():
            if name not in wanted:
                continue
            performance = dict(performance)
            if performance.pop("cuda_graphs", False):
                os.environ["CHERRY_CUDA_GRAPHS_MAX_BATCH"] = "100000"
            epochs = 3 if performance["compile"] == "on" else 2
            run = cherry_train(root, batch, epochs, performance)
            os.environ.pop("CHERRY_CUDA_GRAPHS_MAX_BATCH", None)
            key = f"cherry-train, batch {batch}, {name}"
            # With compiling, the last epoch: the first steady one may still be warming up.
            figures[key] = run["last_epoch"] if performance["compile"] == "on" else run["steady"]
            figures[f"{key}, first epoch"] = run["first_epoch"]
            figures[f"{key}, checkpoint s"] = run["checkpoint_seconds"]
            jobs[key] = run  # with every window's figure, for the JSON
            print(f"cherry-train b{batch} {name}: "
                  f"{ {k: v for k, v in run.items() if k != 'windows'} }", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--variants", nargs="+", default=[
        "loader workers", "gpu pipeline", "gpu pipeline + fused",
        "gpu pipeline + fused + compile"])
    parser.add_argument("--no-checkpoint-stall", action="store_true")
    parser.add_argument("--compiled-ceiling", action="store_true",
                        help="also the ceiling with the trainer's compiled, fused set-up")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    from cherry_train import logs

    logs.configure("console", "warning")  # the worker's info events still reach its worker.log
    torch.backends.cudnn.benchmark = True
    card = torch.cuda.get_device_name()
    print(f"card: {card}; torch {torch.__version__}; {os.cpu_count()} CPU cores", flush=True)
    figures, jobs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        t = time.perf_counter()
        make_dataset(root / "data", args.images)
        print(f"dataset: {args.images} JPEGs 500x375 in {time.perf_counter() - t:.0f} s",
              flush=True)
        os.environ.setdefault("CHERRY_CACHE_DIR", str(Path(tmp) / "cache"))
        figures["seed recipe, batch 32"] = seed_recipe(root / "data", 32)
        print(f"seed recipe b32: {figures['seed recipe, batch 32']:.0f} img/s", flush=True)
        figures["synthetic ceiling, batch 256"] = synthetic_ceiling(256)
        print(f"ceiling b256: {figures['synthetic ceiling, batch 256']:.0f} img/s", flush=True)
        if args.compiled_ceiling:
            key = "synthetic ceiling, batch 256, fused + compiled"
            figures[key] = synthetic_ceiling(256, compiled=True)
            print(f"compiled ceiling b256: {figures[key]:.0f} img/s", flush=True)
        run_variants(root, args.batches, args.variants, figures, jobs)
    sys.path.insert(0, str(Path(__file__).parent))
    from checkpoint_stall import measure

    if not args.no_checkpoint_stall:
        stall = measure("cuda")
        figures["checkpoint, synchronous save s"] = stall["synchronous_s"]
        figures["checkpoint, background stall s"] = stall["background_stall_s"]
        print(f"checkpoint ({stall['bytes'] / 1e6:.0f} MB): synchronous "
              f"{stall['synchronous_s']:.3f} s, background {stall['background_stall_s']:.3f} s "
              f"of training (write {stall['background_write_s']:.3f} s)", flush=True)
    seed = figures["seed recipe, batch 32"]
    eager = figures["synthetic ceiling, batch 256"]
    compiled = figures.get("synthetic ceiling, batch 256, fused + compiled")
    print(f"\n{card}, ResNet-50, 224 px, {args.images} JPEGs")
    print(f"{'setup':72s} {'images/s':>8s}  {'vs seed':>7s}  vs the ceiling of the same set-up")
    for name, value in figures.items():
        if value is None or name.startswith("checkpoint") or name.endswith("checkpoint s"):
            continue
        ratio = f"{value / seed:6.2f}x"
        if "batch 256" in name and "ceiling" not in name:  # eager against eager, compiled
            ceiling = compiled if "compile" in name and compiled else eager  # against compiled
            kind = "compiled" if ceiling is compiled else "eager"
            ratio += f"  {value / ceiling:4.2f}x the {kind} ceiling"
        print(f"{name:72s} {value:8.0f}  {ratio}")
    for name, value in figures.items():
        if name.endswith("checkpoint s"):
            print(f"checkpoint stall (median) in {name.removesuffix(', checkpoint s')}: {value} s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "train_throughput.json").write_text(json.dumps(
            {"card": card, "torch": torch.__version__, "figures": figures, "jobs": jobs},
            indent=2))


if __name__ == "__main__":
    main()
