"""Accuracy parity over seeds: a prepared pack vs the original photos (issue 24 goal 5).

The long test's run (tests/test_inplace.py: the demo task as 1600x1200 photos, the demo's
recipe at batch 16, `input_pipeline: workers` with one loader process, one torch thread as the
tests have), once per seed: from the original files (the baseline), then from a prepared pack
of each `--chroma`. One seed's run is deterministic on one machine; what differs between seeds
is the initial weights, the order and the crop boxes, so the seeds show the spread the test's
one seed is a draw from. Prints a row per seed and each pack's mean difference to the files.

    python benchmarks/parity.py [--seeds 1,2,3] [--chroma 4:4:4,4:2:0] [--train 600]
                                [--val 200] [--epochs 8]

About 2.5 minutes per seed on the 2-core dev VM (the files' full-size decodes are most of it).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the test's helpers, as pytest finds them


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1,2,3", help="comma-separated training seeds")
    ap.add_argument("--chroma", default="4:4:4", help="comma-separated: the packs to compare")
    ap.add_argument("--train", type=int, default=600)
    ap.add_argument("--val", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=8)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    chromas = args.chroma.split(",")

    import structlog
    import torch
    from conftest import TINY_CONFIG
    from test_inplace import accuracy_from, parity_config, photo_dataset

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    torch.set_num_threads(1)
    os.environ["CHERRY_DEVICE"] = "cpu"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"{args.train} + {args.val} photos, {args.epochs} epochs")
    print(f"| seed | original files | {' | '.join(f'pack {c}' for c in chromas)} | seconds |")
    print(f"|---|---|{'---|' * len(chromas)}---|")
    differences: dict[str, list[float]] = {c: [] for c in chromas}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in ("CHERRY_CONFIG_DIR", "CHERRY_DATA_DIR", "CHERRY_CACHE_DIR"):
            os.environ[name] = str(tmp / name.lower())  # never the user's settings or cache
        photo_dataset(tmp / "photos", args.train, args.val)
        for seed in seeds:
            started = time.perf_counter()
            config = parity_config({**copy.deepcopy(TINY_CONFIG), "seed": seed}, args.epochs)
            files = accuracy_from(tmp / "photos", tmp / f"{seed}-files", config, "files")
            packs = [accuracy_from(tmp / "photos", tmp / f"{seed}-{c.replace(':', '')}", config,
                                   "prepared", chroma=c) for c in chromas]
            for chroma, pack in zip(chromas, packs, strict=True):
                differences[chroma].append(pack - files)
            print(f"| {seed} | {files:.3f} | {' | '.join(f'{a:.3f}' for a in packs)} | "
                  f"{time.perf_counter() - started:.0f} |", flush=True)
    for chroma, diffs in differences.items():
        spread = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
        print(f"pack {chroma} - files: mean {100 * statistics.mean(diffs):+.2f} points, "
              f"sd {100 * spread:.2f}, largest {100 * max(diffs, key=abs):+.1f}")


if __name__ == "__main__":  # loader processes start by forkserver: they import this file
    main()
