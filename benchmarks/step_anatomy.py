"""Where a compiled training step loses time against the synthetic ceiling, in one run.

    python benchmarks/step_anatomy.py [--batch 256] [--images 10240] [--out DIR]

The same compiled ResNet-50 (bf16, channels_last, fused Adam) is fed, in turn:
1. one batch already on the GPU, over and over (the ceiling), timed in windows over a long run
   so that clock and power throttling under sustained load show up;
2. fresh batches from the GPU input pipeline (`GpuBatches`: crop boxes from loader processes,
   gather + roi_align on the GPU);
3. the same, reading the running loss every 10 steps (the trainer's host sync);
then a real job through the real worker, with the training step wrapped to time the host side
of each step and to record a torch.profiler trace of a few steady steps. SM clock and power
are sampled throughout (nvidia-smi), so each phase can be read against them.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import ceiling_step, cherry_train, make_dataset  # noqa: E402

WARMUP, WINDOW = 15, 50


class Clocks:
    """nvidia-smi sampling SM clock, power and temperature every 200 ms into a CSV."""

    def __init__(self, path: Path):
        self.path = path
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,"
                 "utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"],
                stdout=path.open("w"), stderr=subprocess.DEVNULL)
        self.marks: list[tuple[float, str]] = []

    def mark(self, name: str) -> None:
        self.marks.append((time.time(), name))

    def summary(self) -> list[tuple[str, float, float, float]]:
        """(phase, median SM MHz, median W, median utilisation %) between consecutive marks."""
        if self.proc is None:
            return []
        self.proc.terminate()
        self.proc.wait()
        rows = []
        for line in self.path.read_text().splitlines():
            parts = [p.strip() for p in line.split(",")]
            try:
                stamp = time.mktime(time.strptime(parts[0].split(".")[0], "%Y/%m/%d %H:%M:%S"))
                rows.append((stamp, float(parts[1]), float(parts[2]), float(parts[4])))
            except (ValueError, IndexError):
                continue
        out = []
        for (start, name), (end, _) in zip(self.marks, self.marks[1:] + [(time.time(), "")],
                                           strict=True):
            inside = [r for r in rows if start <= r[0] <= end]
            if inside:
                out.append((name, statistics.median(r[1] for r in inside),
                            statistics.median(r[2] for r in inside),
                            statistics.median(r[3] for r in inside)))
        return out


def timed_windows(step, batches, windows: int, sync_every: int | None = None) -> list[float]:
    """Images/s in consecutive windows of WINDOW steps, after WARMUP steps."""
    it = iter(batches)
    for _ in range(WARMUP):
        step(*next(it))
    torch.cuda.synchronize()
    rates = []
    running = torch.zeros((), device="cuda", dtype=torch.float64)
    for _ in range(windows):
        started, seen = time.perf_counter(), 0
        for i in range(WINDOW):
            x, y = next(it)
            loss = step(x, y)
            running += loss
            seen += y.shape[0]
            if sync_every and (i + 1) % sync_every == 0:
                running.item()
        torch.cuda.synchronize()
        rates.append(seen / (time.perf_counter() - started))
    return rates


def pipeline(batch: int, images: int, workers: int):
    from cherry_train.worker.inputs.gpudata import DecodedImages, GpuBatches
    from cherry_train.worker.inputs.samples import EpochSampler

    side = 317
    decoded = DecodedImages(torch.randint(0, 256, (images, 3, side, side), dtype=torch.uint8,
                                          device="cuda"),
                            np.tile(np.array([[500, 375]]), (images, 1)),
                            torch.randint(0, 2, (images,), device="cuda"), 0.0)
    batches = GpuBatches(decoded, EpochSampler(images, 0, True, images // batch * batch), batch,
                         224, True, 0.5, 0, True, drop_last=True, num_workers=workers)

    def forever():
        epoch = 0
        while True:
            batches.sampler.set_position(epoch, 0)
            yield from batches
            epoch += 1
    return forever()


class StepProbe:
    """The step seam around steps.train_step: host seconds inside each step and between steps
    (loop, next batch), and a profiler trace of `trace_steps` steps from step `trace_from` on."""

    def __init__(self, out: Path, trace_from: int, trace_steps: int):
        from cherry_train.worker.training.steps import train_step

        self.original = train_step
        self.out, self.trace_from, self.trace_steps = out, trace_from, trace_steps
        self.inside: list[float] = []
        self.between: list[float] = []
        self.last_exit: float | None = None
        self.n = 0
        self.prof = None

    def __call__(self, job, x, y):
        entered = time.perf_counter()
        if self.last_exit is not None:
            self.between.append(entered - self.last_exit)
        self.n += 1
        if self.n == self.trace_from:
            self.prof = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU,
                            torch.profiler.ProfilerActivity.CUDA])
            self.prof.__enter__()
        out = self.original(job, x, y)
        self.inside.append(time.perf_counter() - entered)
        if self.n == self.trace_from + self.trace_steps - 1 and self.prof is not None:
            torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            trace = self.out / "trace.json"
            self.prof.export_chrome_trace(str(trace))
            with trace.open("rb") as f, gzip.open(self.out / "trace.json.gz", "wb") as g:
                shutil.copyfileobj(f, g)
            trace.unlink()
            table = self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
            (self.out / "profile_cpu.txt").write_text(table)
            table = self.prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
            (self.out / "profile_cuda.txt").write_text(table)
            self.prof = None
        self.last_exit = time.perf_counter()
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--images", type=int, default=10240)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("anatomy"))
    parser.add_argument("--skip", nargs="*", default=[], help="phases to leave out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from cherry_train import logs

    logs.configure("console", "warning")
    torch.backends.cudnn.benchmark = True
    card = torch.cuda.get_device_name()
    print(f"card: {card}; torch {torch.__version__}; {os.cpu_count()} CPU cores", flush=True)
    clocks = Clocks(args.out / "clocks.csv")
    results: dict[str, list[float]] = {}
    b = args.batch
    x = torch.randn(b, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (b,), device="cuda")
    clocks.mark("compile")
    t = time.perf_counter()
    step = ceiling_step(compiled=True)
    for _ in range(3):
        step(x, y)
    torch.cuda.synchronize()
    print(f"compiled in {time.perf_counter() - t:.1f} s", flush=True)

    def phase(name: str, batches, **kw):
        clocks.mark(name)
        rates = timed_windows(step, batches, args.windows, **kw)
        results[name] = rates
        print(f"{name}: " + " ".join(f"{r:.0f}" for r in rates), flush=True)

    phase("ceiling: one batch on the GPU", iter(lambda: (x, y), None))
    if "pipeline" not in args.skip:
        phase("GpuBatches, 2 box workers", pipeline(b, args.images, 2))
        phase("GpuBatches, 2 box workers, .item() every 10", pipeline(b, args.images, 2),
              sync_every=10)
        phase("GpuBatches, boxes on the main thread", pipeline(b, args.images, 0))
    phase("ceiling again", iter(lambda: (x, y), None))

    if "job" not in args.skip:

        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "root"
            make_dataset(root / "data", args.images)
            os.environ.setdefault("CHERRY_CACHE_DIR", str(Path(tmp) / "cache"))
            steps_per_epoch = args.images // b
            epochs = 4
            # Trace a few steps in the middle of the last epoch.
            probe = StepProbe(args.out, trace_from=steps_per_epoch * (epochs - 1) + 12,
                              trace_steps=6)
            clocks.mark("cherry-train job")
            from cherry_train.worker.training.train import Seams, Training

            run = cherry_train(root, b, epochs, {"input_pipeline": "gpu", "compile": "on"},
                               trainer=Training(Seams(step=probe)))
            print(f"cherry-train job: {run}", flush=True)
            steady = slice(steps_per_epoch * (epochs - 1), None)
            inside, between = probe.inside[steady], probe.between[steady]
            print(f"job, last epoch: host ms per step inside train_step "
                  f"median {1000 * statistics.median(inside or [0]):.1f}, "
                  f"between steps median {1000 * statistics.median(between or [0]):.1f} "
                  f"(max {1000 * max(between or [0]):.1f})", flush=True)
            results["cherry-train job, last epoch (its metrics)"] = [run["last_epoch"] or 0]

    print(f"\n{card}, ResNet-50 at 224 px, batch {b}, compiled (default mode), fused Adam, bf16")
    print(f"{'phase':52s} {'median img/s':>12s}  windows")
    for name, rates in results.items():
        print(f"{name:52s} {statistics.median(rates):12.0f}  "
              + " ".join(f"{r:.0f}" for r in rates))
    print("\nclocks (median per phase): SM MHz, W, util %")
    for name, mhz, watts, util in clocks.summary():
        print(f"  {name:50s} {mhz:6.0f} {watts:6.0f} {util:4.0f}")
    (args.out / "anatomy.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
