"""Time the default `cherry demo` end to end and report its validation accuracy.

Goal on the 2-core dev machine: under 3 minutes, best validation accuracy >= 0.90.
Runs the demo as users do (a subprocess of the installed CLI) on a fresh temp root, so the
dataset generation, torch import and worker start are all inside the figure.

    python benchmarks/demo.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_once(root: Path) -> dict:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cherry_train", "demo", "--root", str(root),
                           "--no-progress"], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"demo failed:\n{proc.stderr[-3000:]}")
    result = json.loads(next((root / "done").glob("*/result.json")).read_text())
    return {"seconds": seconds, "best_val_accuracy": result["best"]["val_accuracy"],
            "best_epoch": result["best"]["epoch"], "train_seconds": result["wall_seconds"],
            "images_per_second": result["images_per_second"], "device": result["device"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}")
    rows = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            row = run_once(Path(tmp) / "demo")
        rows.append(row)
        print(f"run {i + 1}: {row['seconds']:.1f} s end to end ({row['train_seconds']:.1f} s "
              f"training, {row['images_per_second']:.0f} img/s on {row['device']}), best val "
              f"accuracy {row['best_val_accuracy']:.3f} at epoch {row['best_epoch']}")
    worst = max(r["seconds"] for r in rows)
    lowest = min(r["best_val_accuracy"] for r in rows)
    print(f"goal: < 180 s and >= 0.90 -> slowest {worst:.1f} s, lowest accuracy {lowest:.3f}: "
          + ("MET" if worst < 180 and lowest >= 0.90 else "NOT MET"))


if __name__ == "__main__":
    main()
