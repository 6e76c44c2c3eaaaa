"""Every rank runs one loop (worker/training/lockstep.py) and asks the same questions at the
same points: rank 0 and a follower (a real process, gloo on the CPU) heard side by side, for a
run with interval checkpoints, an epoch's end and a stop."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from cherry_train.jobqueue.claims import WorkerIdentity
from cherry_train.jobqueue.layout import JobPaths
from cherry_train.schemas import validate_config
from cherry_train.worker.loop import Worker, WorkerOptions
from cherry_train.worker.training import followers
from cherry_train.worker.training.lockstep import AFTER_EPOCH, AFTER_STEP, AT_RESUME, BEFORE_EPOCH
from cherry_train.worker.training.train import Seams, Training
from tests.test_distributed import new_root, two_ranks
from tests.test_training import stopping_at


def note(path: Path, question: str, word: bool) -> None:
    """The `heard` seam, on every rank (a module's function: it reaches the followers pickled)."""
    with path.open("a") as f:
        f.write(f"{os.getpid()}\t{question}\t{int(word)}\n")


def test_rank_0_and_a_follower_ask_the_same_questions_in_the_same_order(
        tmp_path, cherry_images, tiny_config, monkeypatch):
    # A rank out of step waits in a collective the other never reaches: short enough here that
    # a broken loop fails this test in a minute instead of hanging it.
    monkeypatch.setattr(followers, "TIMEOUT_FLOOR_SECONDS", 45.0)
    cfg = {**two_ranks(tiny_config), "lease_seconds": 45,
           "checkpoint": {"every_steps": 2, "keep_last": 8}}
    queue = new_root(tmp_path, cherry_images, "root")
    job_id = queue.submit(validate_config(cfg)).job_id
    heard = tmp_path / "heard.tsv"
    seams = Seams(step=stopping_at(8, Seams().step), heard=functools.partial(note, heard))
    # One attempt: a loop out of step ends it (a RankDied), and a second would only repeat it.
    worker = Worker(queue, WorkerIdentity("w1"), WorkerOptions(gpus=2),
                    trainer=Training(seams))
    assert worker.run_once()
    assert not queue.storage.exists(JobPaths(job_id).result)  # stopped after step 8: released
    by_rank: dict[str, list[tuple[str, int]]] = {}
    for line in heard.read_text().splitlines():
        pid, question, word = line.split("\t")
        by_rank.setdefault(pid, []).append((question, int(word)))
    assert len(by_rank) == 2, by_rank.keys()
    expected = [(AT_RESUME, 0), (BEFORE_EPOCH, 0), *[(AFTER_STEP, 0)] * 6, (AFTER_EPOCH, 0),
                (BEFORE_EPOCH, 0), (AFTER_STEP, 0), (AFTER_STEP, 1)]
    rank_0 = by_rank.pop(str(os.getpid()))
    (follower,) = by_rank.values()
    assert rank_0 == expected
    assert follower == rank_0
    written = [s for s in range(1, 9) if queue.storage.exists(JobPaths(job_id).checkpoint(s))]
    assert written == [2, 4, 6, 8]  # at intervals, the epoch's end, the stop: rank 0 alone
