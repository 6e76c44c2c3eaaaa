"""How long `cherry status` takes with hundreds of finished jobs.

Builds a queue root with N finished jobs and a few running ones, then times the status rows:
cold (no local cache: every job's files are read) and warm (finished rows from the cache, each
checked against its job's result.json: a stat each, 16 in flight), on
a plain folder and on a simulated slow mount (a fixed latency per file operation, as on the
Colab / Drive for Desktop mounts, where each small read is a round trip).

    python benchmarks/status.py [--jobs 500] [--latency-ms 20]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from cherry_train.client.status import job_rows
from cherry_train.jobqueue.claims import WorkerIdentity
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.schemas import BestEpoch, Heartbeat, JobState, Result, validate_config
from cherry_train.storage import LocalStorage

CONFIG = {"model": {"name": "resnet50", "num_classes": 2},
          "training": {"epochs": 30, "batch_size": 32, "learning_rate": 0.001},
          "data": {"train_path": "data/train", "val_path": "data/val"}}


class SlowStorage(LocalStorage):
    """A local folder that answers like a network mount: latency on every call."""

    def __init__(self, root, latency: float):
        super().__init__(root)
        self.latency, self.calls = latency, 0


def _slowed(original):
    def method(self, *args):
        self.calls += 1
        time.sleep(self.latency)
        return original(self, *args)
    return method


for _name in ("read_bytes", "list_dir", "stat"):
    setattr(SlowStorage, _name, _slowed(getattr(LocalStorage, _name)))


def build(root: Path, jobs: int) -> None:
    queue = JobQueue(LocalStorage(root))
    now = datetime.now(timezone.utc)
    for i in range(jobs + 5):
        manifest = queue.submit(validate_config({**CONFIG, "name": f"sweep-{i:03d}"}))
        claim = queue.try_claim(manifest, WorkerIdentity("w"))
        owner = queue.owner(claim)
        if i < jobs:
            queue.commit(owner, Result(job_id=claim.job_id, state=JobState.succeeded,
                                       attempts=1, finished_at=now,
                                       best=BestEpoch(epoch=3, val_accuracy=0.9, val_loss=0.3)))
        else:
            owner.write(claim.paths.heartbeat, Heartbeat(
                job_id=claim.job_id, attempt=1, worker_id="w", at=now).to_json())


def timed(queue: JobQueue, use_cache: bool) -> tuple[float, int]:
    started = time.perf_counter()
    rows = job_rows(queue, use_cache=use_cache)
    return time.perf_counter() - started, len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CHERRY_CACHE_DIR"] = str(Path(tmp) / "cache")
        root = Path(tmp) / "root"
        build(root, args.jobs)
        print(f"{args.jobs} finished + 5 running jobs; machine: {os.cpu_count()} cores")
        for label, storage in (("local folder", LocalStorage(root)),
                               (f"slow mount ({args.latency_ms:g} ms/op)",
                                SlowStorage(root, args.latency_ms / 1000))):
            queue = JobQueue(storage)
            cold, n = timed(queue, use_cache=False)
            timed(queue, use_cache=True)  # fills the cache
            warm, _ = timed(queue, use_cache=True)
            print(f"{label:28s} cold {cold:7.2f} s   warm (cached finished rows) {warm:6.2f} s"
                  f"   ({n} rows, {cold / warm:5.1f}x)")


if __name__ == "__main__":
    main()
