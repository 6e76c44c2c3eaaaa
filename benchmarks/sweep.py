"""A 12-trial sweep (learning rate x weight decay) on the demo's synthetic cherries, run twice in
one go on one local root by 3 worker processes: without early stopping, then with ASHA (trials
below a rung's cut pause, to be promoted or pruned: worker/training/pruning.py). Reports, for each,
the epochs trained, the wall time, the best trial and how every trial went; the goal: ASHA's best
within 0.01 validation accuracy of the full sweep's best, in <= 50% of its epochs and <= 60% of
its wall time.

    python benchmarks/sweep.py [--epochs 9] [--workers 3] [--train 600 --val 200]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cherry_train.demo.run import DemoSize, demo_config, ensure_dataset
from cherry_train.jobqueue.layout import JobPaths
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.jobqueue.sweeps import Sweeps, epoch_values
from cherry_train.schemas import Result, validate_config
from cherry_train.storage import LocalStorage

RATES = [3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4]
DECAYS = [0.0, 0.05]


def run_sweep(root: Path, size: DemoSize, workers: int, early_stop: dict | None) -> dict:
    cfg = demo_config(size)
    cfg.update(name="asha" if early_stop else "full", heartbeat_seconds=2)
    cfg["checkpoint"] = {"every_minutes": 60, "keep_last": 1}
    cfg.update(export={"onnx": False}, tensorboard=False)  # the same work for every trial
    cfg["sweep"] = {"method": "grid", "parallel": workers, "parameters": {
        "training.learning_rate": {"values": RATES},
        "training.weight_decay": {"values": DECAYS}}}
    if early_stop:
        cfg["sweep"]["early_stop"] = early_stop
    queue = JobQueue(LocalStorage(root))
    sweeps = Sweeps(queue)
    started = time.perf_counter()
    record, _ = sweeps.submit(validate_config(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CHERRY_DEVICE": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-m", "cherry_train", "worker", "--root",
                               str(root), "--worker-id", f"w{i}", "--threads", "1",
                               "--poll-seconds", "1"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for i in range(workers)]
    try:
        while True:  # until every trial is made and ended
            trials = sweeps.trials(record.sweep_id)
            if len(trials) == record.trials and not any(t.in_flight for t in trials):
                break
            time.sleep(2)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=120)
    wall = time.perf_counter() - started
    results = [Result.from_json(queue.storage.read_bytes(JobPaths(t.record.job_id).result))
               for t in sweeps.trials(record.sweep_id)]
    best = max(results, key=lambda r: r.best.val_accuracy if r.best else 0)
    trials = sweeps.trials(record.sweep_id)
    trial = next(t for t in trials if t.record.job_id == best.job_id)
    for t, r in zip(trials, results, strict=True):  # how each trial went, epoch by epoch
        curve = " ".join(f"{v:.3f}" for _, v in sorted(epoch_values(
            queue, t.record.job_id, "val_accuracy").items()))
        print(f"  t{t.record.n:<3}{_params(t.record.params):42}{r.state.value:10}"
              f"{r.epochs_completed:>3} epochs{r.attempts:>3} attempts  val accuracy {curve}",
              flush=True)
    return {"wall_seconds": wall, "epochs": sum(r.epochs_completed for r in results),
            "pruned": sum(r.state.value == "pruned" for r in results),
            "best": best.best.val_accuracy, "best_params": trial.record.params}


def _params(params: dict) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v:g}" for k, v in params.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--grace", type=int, default=2, help="ASHA's grace_epochs")
    parser.add_argument("--reduction", type=int, default=2, help="ASHA's reduction")
    args = parser.parse_args()
    size = DemoSize(train=args.train, val=args.val, epochs=args.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("CHERRY_CACHE_DIR", str(Path(tmp) / "cache"))
        runs = {}
        asha = {"method": "asha", "grace_epochs": args.grace, "reduction": args.reduction}
        for name, early_stop in (("full", None), ("asha", asha)):
            root = Path(tmp) / name
            ensure_dataset(root, size, say=lambda *_: None)
            runs[name] = run_sweep(root, size, args.workers, early_stop)
            print(f"{name}: {runs[name]}", flush=True)
    full, asha = runs["full"], runs["asha"]
    print(f"\n{os.cpu_count()} cores, {args.workers} workers, 12 trials x {args.epochs} epochs, "
          f"{args.train}/{args.val} images at {size.image_size} px, {size.model}; ASHA grace "
          f"{args.grace}, reduction {args.reduction}")
    print(f"{'':8}{'epochs':>8}{'wall s':>9}{'pruned':>8}{'best val acc':>14}")
    for name, r in runs.items():
        print(f"{name:8}{r['epochs']:>8}{r['wall_seconds']:>9.0f}{r['pruned']:>8}"
              f"{r['best']:>14.4f}")
    print(f"ASHA: {asha['epochs'] / full['epochs']:.0%} of the epochs, "
          f"{asha['wall_seconds'] / full['wall_seconds']:.0%} of the wall time, best "
          f"{asha['best'] - full['best']:+.4f} against the full sweep's")


if __name__ == "__main__":
    main()
