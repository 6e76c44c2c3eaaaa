"""Results and observability: status, watch, fetch, compare (fake trainer, real folders)."""

from __future__ import annotations

import io
import json
import os
import threading
import time

import pytest
from PIL import Image

from cherry_train.cli import main
from cherry_train.client.fetch import ChecksumMismatch, fetch
from cherry_train.client.status import job_rows, render_table, worker_rows
from cherry_train.client.watch import watch
from cherry_train.jobqueue.claims import WorkerIdentity
from cherry_train.jobqueue.clock import FakeClock
from cherry_train.jobqueue.layout import JobPaths
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.jobqueue.views import job_view
from cherry_train.plots import render_confusion, render_curves, render_overlay
from cherry_train.schemas import Heartbeat, JobState, Result, validate_config
from cherry_train.storage import LocalStorage
from cherry_train.worker.checkpoints.state import TrainState
from cherry_train.worker.errors import JobError
from cherry_train.worker.loop import Worker, WorkerOptions
from cherry_train.worker.outcome import Outcome


def epoch_record(epoch: int, lr: float) -> dict:
    """Epoch `epoch` (1-based, as the worker writes it)."""
    loss = 0.7 / (1 + (epoch - 1) * lr * 1000)
    return {"kind": "epoch", "epoch": epoch, "step": epoch * 6, "train_loss": loss,
            "train_accuracy": 1 - loss, "val_loss": loss * 1.1, "val_accuracy": 0.95 - loss}


def fake_trainer(epochs=3, weights_bytes=3 << 20, pause=0.0, checkpoint_errors=()):
    """Writes what a real trainer writes (metrics, curves, best weights), without torch;
    `checkpoint_errors`: the epochs whose checkpoint could not be written."""
    def train(run):
        claim, reporter, scratch = run.claim, run.reporter, run.scratch
        lr = claim.manifest.config.training.learning_rate
        for epoch in range(epochs):
            failed = epoch in checkpoint_errors
            reporter.update(phase="training", epoch=epoch + 1, step=(epoch + 1) * 6,
                            epochs=epochs,
                            steps_per_epoch=6, loss=0.5, images_per_second=123.0,
                            storage_error="checkpoint at step 12 not written (OSError: no "
                                          "space); training goes on" if failed else None,
                            last_checkpoint_step=epoch * 6 if failed else (epoch + 1) * 6)
            reporter.metric(epoch_record(epoch + 1, lr))
            reporter.beat()
            time.sleep(pause)
        scratch.mkdir(parents=True, exist_ok=True)
        weights = scratch / "best.pt"
        weights.write_bytes(os.urandom(weights_bytes))
        reporter.owner.upload(weights, claim.paths.best_weights)
        reporter.write_curves(claim.job_id)
        state = TrainState(epoch=epochs, global_step=epochs * 6, wall_seconds=12.0,
                           train_seconds=10.0, images_seen=1200,
                           best={"epoch": epochs, "val_accuracy": 0.9, "val_loss": 0.3},
                           last_epoch={"train_loss": 0.2, "val_accuracy": 0.9})
        return Outcome(completed=True, state=state, device="Tesla T4", precision="fp16",
                       threads=1)
    return train


def run(queue, tiny_config, **overrides):
    cfg = {**tiny_config, **overrides}
    job_id = queue.submit(validate_config(cfg)).job_id
    Worker(queue, WorkerIdentity("w1"), WorkerOptions(exit_when_idle=True),
           trainer=fake_trainer()).run()
    return job_id


@pytest.fixture
def queue(tmp_path):
    return JobQueue(LocalStorage(tmp_path / "root"), FakeClock())


def test_status_shows_every_state_with_the_right_details(queue, tiny_config):
    clock = queue.clock
    run(queue, tiny_config, name="done")
    cancelled = queue.submit(validate_config({**tiny_config, "name": "cancelled"})).job_id
    queue.request_cancel(cancelled)
    queue.storage.write_atomic("queue/00000000-000000-broken-0000.json", b"{oops")
    Worker(queue, WorkerIdentity("w1"), WorkerOptions(exit_when_idle=True)).run_once()
    stalled = queue.submit(validate_config({**tiny_config, "name": "stalled"}))
    live = queue.submit(validate_config({**tiny_config, "name": "live"}))
    for manifest, worker in ((stalled, "w3"), (live, "w2")):
        claim = queue.try_claim(manifest, WorkerIdentity(worker))
        hb = Heartbeat(job_id=claim.job_id, attempt=1, worker_id=worker, at=clock.now(),
                       phase="training", epoch=1, epochs=2, step=9, steps_per_epoch=6,
                       loss=0.41, accuracy=0.8, images_per_second=880.0, eta_seconds=95,
                       device="NVIDIA L4", last_checkpoint_step=6,
                       storage_error="checkpoint at step 9 not written (OSError: [Errno 28] "
                                     "No space left on device); training goes on"
                       if worker == "w2" else None)
        queue.owner(claim).write(claim.paths.heartbeat, hb.to_json())
        if worker == "w3":
            clock.advance(10)  # the stalled one's heartbeat is now older than its 5 s lease
    queued = queue.submit(validate_config({**tiny_config, "name": "waiting"})).job_id
    rows = {r["name"] or r["job_id"]: r for r in job_rows(queue)}
    assert rows["done"]["state"] == "succeeded" and rows["done"]["best_val_accuracy"] == 0.9
    assert rows["done"]["device"] == "Tesla T4" and rows["done"]["epochs"] == 2
    assert rows["cancelled"]["state"] == "cancelled"
    assert rows["00000000-000000-broken-0000"]["state"] == "failed"
    assert rows["live"]["state"] == "running" and not rows["live"]["stalled"]
    assert rows["live"]["total_steps"] == 12 and rows["live"]["accuracy"] == 0.8
    assert rows["stalled"]["state"] == "running" and rows["stalled"]["stalled"]
    assert rows["waiting"]["state"] == "queued"
    ids = [r["job_id"] for r in job_rows(queue)]
    assert ids == sorted(ids, reverse=True)  # newest first
    table = render_table(job_rows(queue), worker_rows(queue))
    assert "running (stalled)" in table and "probably gone" in table
    assert "########.." in table  # 9 of 12 steps
    assert "L4" in table and "880" in table and "1m" not in table.split(queued)[1][:20]
    assert "failed: not a valid manifest: Invalid JSON" in table  # the broken one, and why
    live_id = rows["live"]["job_id"]
    assert f"! {live_id}: checkpoint at step 9 not written (OSError: [Errno 28] No space left " \
           "on device); training goes on. A disconnect now would resume from step 6" in table
    assert table.count("not written") == 1


def test_status_json_schema(queue, tiny_config, capsys):
    run(queue, tiny_config)
    capsys.readouterr()  # the worker's log lines
    assert main(["status", "--root", str(queue.storage.local_path("")), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert {"job_id", "state", "stalled", "attempt", "epoch", "epochs", "loss", "accuracy",
            "best_val_accuracy", "images_per_second", "eta_seconds", "worker_id", "device",
            "heartbeat_age_seconds", "error"} <= set(row)


def test_finished_jobs_are_not_read_again(queue, tiny_config, monkeypatch):
    for i in range(3):
        run(queue, tiny_config, name=f"job{i}")
    job_rows(queue)
    reads = []
    original = LocalStorage.read_bytes
    monkeypatch.setattr(LocalStorage, "read_bytes",
                        lambda self, path: reads.append(path) or original(self, path))
    rows = job_rows(queue)
    assert len(rows) == 3 and reads == []  # only listings: fast on a Drive mount


def test_fetch_verifies_and_resumes(queue, tiny_config, tmp_path):
    job_id = run(queue, tiny_config)
    dest = tmp_path / "fetched"
    first = {f.path.name: f.status for f in fetch(queue, job_id, dest, progress=False)}
    assert first["best.pt"] == "downloaded" and first["curves.png"] == "downloaded"
    assert set(first) >= {"result.json", "metrics.jsonl", "config.yaml", "worker.log"} or \
        set(first) >= {"result.json", "metrics.jsonl", "config.yaml"}
    root_best = queue.storage.local_path(JobPaths(job_id).best_weights)
    assert (dest / "best.pt").read_bytes() == root_best.read_bytes()
    # Again: nothing to download.
    again = {f.path.name: f.status for f in fetch(queue, job_id, dest, progress=False)}
    assert again["best.pt"] == "up to date"
    # A cut download continues where it stopped.
    (dest / "best.pt").unlink()
    (dest / "best.pt.partial").write_bytes(root_best.read_bytes()[: 1 << 20])
    resumed = {f.path.name: f for f in fetch(queue, job_id, dest, progress=False)}
    assert resumed["best.pt"].status == "resumed"
    assert (dest / "best.pt").read_bytes() == root_best.read_bytes()
    # A file that changed in the root since its result was written is refused.
    (dest / "best.pt").unlink()
    root_best.write_bytes(b"tampered" + root_best.read_bytes()[8:])
    with pytest.raises(ChecksumMismatch):
        fetch(queue, job_id, dest, progress=False)
    assert not (dest / "best.pt").exists() and not (dest / "best.pt.partial").exists()


def test_fetch_cli_with_checkpoints(queue, tiny_config, tmp_path, capsys):
    job_id = run(queue, tiny_config)
    paths = JobPaths(job_id)
    queue.storage.write_atomic(paths.checkpoint(6), b"checkpoint bytes")
    import hashlib

    queue.storage.write_atomic(paths.checkpoint_checksum(6),
                               hashlib.sha256(b"checkpoint bytes").hexdigest().encode())
    root = str(queue.storage.local_path(""))
    assert main(["fetch", job_id[-4:], "--root", root, "--dest", str(tmp_path / "d"),
                 "--checkpoints"]) == 0
    assert (tmp_path / "d" / job_id / "checkpoints" / "step-000000006.pt").read_bytes() == \
        b"checkpoint bytes"
    captured = capsys.readouterr()
    assert captured.out.strip().endswith(job_id)
    assert "unverified" not in captured.out + captured.err  # a finished job: all verified
    assert "no result yet" not in captured.err


def test_compare_two_jobs(queue, tiny_config, tmp_path, capsys):
    a = run(queue, tiny_config, name="lr-small")
    b = run(queue, {**tiny_config, "training": {**tiny_config["training"],
                                                 "learning_rate": 0.01}}, name="lr-big")
    out = tmp_path / "cmp.png"
    root = str(queue.storage.local_path(""))
    assert main(["compare", "lr-*", "--root", root, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "training.learning_rate" in text and "0.003" in text and "0.01" in text
    assert "training.batch_size" not in text  # the same in both: not a difference
    assert a in text and b in text
    with Image.open(out) as img:
        assert img.size == (1100, 420)
    assert main(["compare", a, "--root", root]) == 2  # one job is no comparison


def test_watch_follows_a_job_to_its_end(tmp_path, tiny_config):
    queue = JobQueue(LocalStorage(tmp_path / "root"))
    job_id = queue.submit(validate_config(tiny_config)).job_id
    worker = Worker(queue, WorkerIdentity("w1"), WorkerOptions(exit_when_idle=True),
                    trainer=fake_trainer(epochs=3, pause=0.3))
    thread = threading.Thread(target=worker.run)
    thread.start()
    lines = []
    state = watch(queue, job_id, say=lines.append, poll_seconds=0.1, progress=False)
    thread.join()
    assert state.value == "succeeded"
    assert [x.split(":")[0] for x in lines if x.startswith("epoch")] == \
        ["epoch 1/2", "epoch 2/2", "epoch 3/2"]
    assert lines[-1].startswith(f"{job_id}: succeeded, best val accuracy 0.900")


def test_watch_says_once_when_checkpoints_cannot_be_written(tmp_path, tiny_config):
    queue = JobQueue(LocalStorage(tmp_path / "root"))
    job_id = queue.submit(validate_config(tiny_config)).job_id
    worker = Worker(queue, WorkerIdentity("w1"), WorkerOptions(exit_when_idle=True),
                    trainer=fake_trainer(epochs=3, pause=0.3, checkpoint_errors={1}))
    thread = threading.Thread(target=worker.run)
    thread.start()
    lines = []
    watch(queue, job_id, say=lines.append, poll_seconds=0.1, progress=False)
    thread.join()
    warnings = [x for x in lines if "not written" in x]
    assert warnings == ["checkpoint at step 12 not written (OSError: no space); training goes "
                        "on. A disconnect now would resume from step 6. Is the queue root's "
                        "storage full, or its mount down?"]


@pytest.mark.parametrize(("png", "size"), [
    (lambda: render_curves([epoch_record(e, 0.001) for e in range(1, 5)], "t"), (1000, 400)),
    (lambda: render_overlay({"a": [epoch_record(1, 0.001)], "b": []}), (1100, 420)),
    (lambda: render_confusion([[5, 1], [2, 7]], ["defect", "good"], "t"), (370, 314)),
])
def test_pictures_are_real_pngs_of_the_right_size(png, size):
    with Image.open(io.BytesIO(png())) as img:
        img.load()
        assert img.format == "PNG" and img.size == size


def checkpointing_trainer(steps=(6, 12, 18), fail=False):
    """Writes checkpoints as the real one does (file, then checksum); fails at the end if asked."""
    inner = fake_trainer()

    def train(run):
        claim, reporter = run.claim, run.reporter
        for step in steps:
            reporter.owner.write(claim.paths.checkpoint(step), b"c" * 1000)
            reporter.owner.write(claim.paths.checkpoint_checksum(step), b"x\n")
        if fail:
            raise JobError("data.image_size: too small for this model")
        return inner(run)
    return train


@pytest.mark.parametrize(("fail", "keep", "left"), [(False, 0, []), (False, 1, [18]),
                                                     (True, 0, [18]), (True, 2, [12, 18])])
def test_a_finished_job_keeps_only_the_checkpoints_it_may_need(queue, tiny_config, fail, keep,
                                                               left):
    cfg = {**tiny_config, "checkpoint": {"keep_last": 5, "keep_after_finish": keep}}
    job_id = queue.submit(validate_config(cfg)).job_id
    Worker(queue, WorkerIdentity("w1"), WorkerOptions(exit_when_idle=True),
           trainer=checkpointing_trainer(fail=fail)).run()
    assert job_view(queue, job_id).state.value == ("failed" if fail else "succeeded")
    names = queue.storage.list_dir(JobPaths(job_id).checkpoints_dir)
    assert sorted(n for n in names if n.endswith(".pt")) == \
        [f"step-{s:09d}.pt" for s in left]
    assert len(names) == 2 * len(left)  # each with its checksum
    (row,) = job_rows(queue, use_cache=False)
    assert row["checkpoint_bytes"] == 1000 * len(left) + 2 * len(left)
    assert row["bytes"] >= row["checkpoint_bytes"] + (0 if fail else 3 << 20)  # best.pt


def test_checkpoints_left_by_a_crash_after_the_commit_go_at_the_next_claim(queue, tiny_config):
    manifest = queue.submit(validate_config(tiny_config))
    claim = queue.try_claim(manifest, WorkerIdentity("w1"))
    owner = queue.owner(claim)
    for step in (6, 12):
        owner.write(claim.paths.checkpoint(step), b"c")
        owner.write(claim.paths.checkpoint_checksum(step), b"x\n")
    # The worker died right after creating result.json: manifest still queued, checkpoints kept.
    result = Result(job_id=claim.job_id, state=JobState.succeeded, attempts=1,
                    finished_at=queue.clock.now(), worker_id="w1")
    queue.storage.create_exclusive(claim.paths.result, result.to_json())
    assert queue.try_claim(manifest, WorkerIdentity("w2")) is None
    assert queue.storage.list_dir(claim.paths.checkpoints_dir) == []
    assert queue.storage.exists(claim.paths.done_manifest)


def test_status_says_how_much_the_root_holds(queue, tiny_config):
    cfg = {**tiny_config, "checkpoint": {"keep_after_finish": 1}}
    job_id = queue.submit(validate_config(cfg)).job_id
    Worker(queue, WorkerIdentity("w1"), WorkerOptions(exit_when_idle=True),
           trainer=checkpointing_trainer()).run()
    table = render_table(job_rows(queue), worker_rows(queue))
    assert "storage: 1 job holds 3.2 MB, 1.0 kB of it checkpoints" in table, table
    assert job_id in table


def test_confusion_counts_are_readable_on_every_cell():
    import matplotlib

    from cherry_train.plots import CONFUSION_CMAP, contrast, text_color

    for share in [i / 20 for i in range(21)]:
        cell = matplotlib.colormaps[CONFUSION_CMAP](share)
        ink = (0, 0, 0) if text_color(share) == "black" else (1, 1, 1)
        assert contrast(cell, ink) >= 4.5, (share, text_color(share))  # WCAG AA
    # Every cell busy: the smallest count (10 of 16) is drawn from 0, not as the lightest cell.
    assert render_confusion([[16, 10], [12, 16]], ["defect", "good"], "t")[:4] == b"\x89PNG"


def test_a_handed_back_job_says_it_waits_for_a_worker(queue, tiny_config):
    """After Ctrl-C the job is checkpointed and released: nobody trains it, so status shows no
    ETA nor fresh heartbeat, and watch says once what it waits for instead of a climbing ETA."""
    clock = queue.clock
    manifest = queue.submit(validate_config(tiny_config))
    claim = queue.try_claim(manifest, WorkerIdentity("vm"))
    hb = Heartbeat(job_id=claim.job_id, attempt=1, worker_id="vm", at=clock.now(),
                   phase="released", released=True, epoch=1, epochs=2, step=9,
                   steps_per_epoch=6, loss=0.4, images_per_second=800.0, eta_seconds=95,
                   last_checkpoint_step=9)
    queue.owner(claim).write(claim.paths.heartbeat, hb.to_json())
    (row,) = job_rows(queue, use_cache=False)
    assert row["released"] and row["eta_seconds"] is None and row["state"] == "running"
    table = render_table([row], [])
    assert "waiting (handed back)" in table and "1m" not in table  # no ETA
    assert f"! {claim.job_id}: handed back (its worker was stopped); waits for a worker to " \
           "resume it from step 9" in table
    said, polls = [], []

    def sleep(_seconds):  # the third poll finds it finished by a restarted worker
        polls.append(1)
        if len(polls) == 3:
            result = Result(job_id=claim.job_id, state=JobState.succeeded, attempts=2,
                            finished_at=clock.now(), worker_id="vm")
            queue.storage.create_exclusive(claim.paths.result, result.to_json())
    assert watch(queue, claim.job_id, say=said.append, poll_seconds=0, progress=False,
                 sleep=sleep) == JobState.succeeded
    waiting = [s for s in said if s.startswith("handed back")]
    assert waiting == ["handed back at step 9 (its worker was stopped); waiting for a worker to "
                       "resume it from step 9 (start one: the Colab notebook, or "
                       "`cherry worker`)"]


def test_status_columns_hold_one_thing_each(queue, tiny_config):
    job_id = run(queue, tiny_config)
    (row,) = job_rows(queue, use_cache=False)
    # Finished: the last epoch's training figures, as while running; validation in BEST VAL.
    assert row["loss"] == 0.2 and row["accuracy"] is None and row["best_val_accuracy"] == 0.9
    header = render_table([row], []).splitlines()[0]
    assert header.split()[:11] == ["JOB", "STATE", "TRY", "PROGRESS", "EPOCH", "TRAIN", "LOSS",
                                   "TRAIN", "ACC", "BEST", "VAL"]
    assert job_id in render_table([row], [])


def test_compare_leaves_out_what_says_nothing(queue, tiny_config, tmp_path, capsys,
                                             monkeypatch):
    """A cancelled job has no curve (so no legend entry), and no data hash: the data did not
    differ between the jobs that ran, so no dataset column."""
    from cherry_train import plots

    a = run(queue, tiny_config, name="lr-a")
    b = run(queue, {**tiny_config, "training": {**tiny_config["training"],
                                                 "learning_rate": 0.01}}, name="lr-b")
    for job in (a, b):  # the same data for both
        path = JobPaths(job).result
        result = json.loads(queue.storage.read_bytes(path))
        queue.storage.write_atomic(path, json.dumps({**result, "dataset_sha256": "ab" * 32})
                                   .encode())
    cancelled = queue.submit(validate_config({**tiny_config, "name": "lr-c"})).job_id
    queue.request_cancel(cancelled)
    Worker(queue, WorkerIdentity("w1"), WorkerOptions(exit_when_idle=True)).run_once()
    drawn = {}
    original = plots.render_overlay
    monkeypatch.setattr(plots, "render_overlay",
                        lambda series, title="": drawn.update(series, title=title) or
                        original(series, title))
    root = str(queue.storage.local_path(""))
    assert main(["compare", "lr-*", "--root", root, "--out", str(tmp_path / "c.png")]) == 0
    text = capsys.readouterr().out
    assert "dataset_sha256" not in text and cancelled in text
    labels = [k for k in drawn if k != "title"]
    assert len(labels) == 2 and all(cancelled[-4:] not in k for k in labels)
    assert f"no epoch yet: lr-c ({cancelled[-4:]})" in drawn["title"]


def test_watch_has_an_exit_code_for_every_finished_state():
    from cherry_train.client.watch import EXIT_CODES
    from cherry_train.schemas.records import FINISHED

    assert set(EXIT_CODES) == set(FINISHED) == {s for s in JobState if s.finished}
    codes = list(EXIT_CODES.values())
    assert len(set(codes)) == len(codes) and 2 not in codes  # 2: the user's input is wrong
    assert EXIT_CODES[JobState.succeeded] == 0


def test_watch_on_a_pruned_trial_exits_4_without_a_traceback(queue, tiny_config, capsys):
    job_id = run(queue, tiny_config)
    path = JobPaths(job_id).result
    result = json.loads(queue.storage.read_bytes(path))
    queue.storage.write_atomic(path, json.dumps({**result, "state": "pruned"}).encode())
    capsys.readouterr()
    assert main(["watch", job_id, "--root", str(queue.storage.local_path("")),
                 "--no-progress"]) == 4
    assert f"{job_id}: pruned" in capsys.readouterr().out


def test_compare_never_overwrites_an_earlier_picture_unasked(queue, tiny_config, tmp_path,
                                                             capsys, monkeypatch):
    run(queue, tiny_config, name="lr-a")
    run(queue, tiny_config, name="lr-b")
    root = str(queue.storage.local_path(""))
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    capsys.readouterr()
    said = []
    for _ in range(2):
        assert main(["compare", "lr-*", "--root", root]) == 0
        said.append(capsys.readouterr().out.splitlines()[-1])
    assert said == [f"curves: {here / 'cherry-compare.png'}",
                    f"curves: {here / 'cherry-compare-2.png'}"]
    assert main(["compare", "lr-*", "--root", root, "--out", "cherry-compare.png"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == \
        f"curves: {here / 'cherry-compare.png'} (replaced the earlier file)"
    assert main(["compare", "lr-*", "--root", root, "--json", "--out", "c.png"]) == 0
    out, err = capsys.readouterr()
    assert len(json.loads(out)["jobs"]) == 2 and err.startswith("curves: ")  # stdout: JSON


def test_compare_shows_the_final_accuracy_only_where_it_is_not_the_best(queue, tiny_config,
                                                                       tmp_path, capsys):
    a = run(queue, tiny_config, name="lr-a")
    run(queue, tiny_config, name="lr-b")
    root = str(queue.storage.local_path(""))
    capsys.readouterr()
    assert main(["compare", "lr-*", "--root", root, "--out", str(tmp_path / "c.png")]) == 0
    assert "final_val_accuracy" not in capsys.readouterr().out  # the same figures: no column
    path = JobPaths(a).result
    result = json.loads(queue.storage.read_bytes(path))
    result["final_metrics"]["val_accuracy"] = 0.85  # the last epoch fell back from the best
    queue.storage.write_atomic(path, json.dumps(result).encode())
    assert main(["compare", "lr-*", "--root", root, "--out", str(tmp_path / "c.png")]) == 0
    header, *rows = capsys.readouterr().out.splitlines()[:3]
    assert header.split().count("final_val_accuracy") == 1
    assert "0.85" in next(r for r in rows if a in r)


# -- what a finished job holds -------------------------------------------------------------------

def _footprint(job_dir) -> tuple[set[str], int]:
    files = {p.relative_to(job_dir).as_posix() for p in job_dir.rglob("*") if p.is_file()}
    return files, sum((job_dir / f).stat().st_size for f in files)


def _trained(root, tiny_config, epochs: int, accuracies=None) -> Result:
    from cherry_train.worker.training.train import Seams, Training

    cfg = {**tiny_config, "training": {**tiny_config["training"], "epochs": epochs},
           "export": {"onnx": True}}
    seams = Seams()
    if accuracies is not None:  # validation as told: which epoch is best is the test's choice
        told = iter(accuracies)
        seams = Seams(validate=lambda job: (0.5, next(told)))
    queue = JobQueue(LocalStorage(root))
    job_id = queue.submit(validate_config(cfg)).job_id
    Worker(queue, WorkerIdentity("w1"), WorkerOptions(exit_when_idle=True),
           trainer=Training(seams)).run()
    return Result.from_json((root / JobPaths(job_id).result).read_bytes())


def test_a_finished_job_whose_last_epoch_was_best_keeps_one_copy_of_its_weights(
        root_with_data, tiny_config, tmp_path):
    """The demo's job held best.pt, final.pt and model.onnx, 3.0x its weights, best.pt and
    final.pt the same weights (issue 25, item 12). Now one copy and the ONNX model: at most
    2.1x; and what reads final.pt still works."""
    result = _trained(root_with_data, tiny_config, epochs=1)
    assert result.state == JobState.succeeded, result.error
    job_dir = root_with_data / "done" / result.job_id
    files, total = _footprint(job_dir)
    weights = (job_dir / "best.pt").stat().st_size
    assert "final.pt" not in files and "model.onnx" in files, files
    assert not [f for f in files if f.startswith("checkpoints/")], files
    assert total <= 2.1 * weights, (total / weights, sorted(files))
    assert result.final_weights_sha256 == result.best_weights_sha256
    assert "final_weights" not in result.artifacts and "best_weights" in result.artifacts
    # fetch brings what the result lists, verified
    fetched = {f.path.name for f in fetch(JobQueue(LocalStorage(root_with_data)), result.job_id,
                                          tmp_path / "got", progress=False)}
    assert {"best.pt", "model.onnx", "result.json"} <= fetched
    # a later config naming its final.pt reads best.pt (evaluation here; pretrained alike)
    evaluation = {"name": "eval", "mode": "evaluation", "model": tiny_config["model"],
                  "data": {"val_path": "data/val", "image_size": 32, "num_workers": 0},
                  "evaluate": {"weights": f"done/{result.job_id}/final.pt", "latency": False},
                  "heartbeat_seconds": 0.2, "lease_seconds": 5}
    queue = JobQueue(LocalStorage(root_with_data))
    eval_id = queue.submit(validate_config(evaluation)).job_id
    Worker(queue, WorkerIdentity("w2"), WorkerOptions(exit_when_idle=True)).run()
    evaluated = Result.from_json((root_with_data / JobPaths(eval_id).result).read_bytes())
    assert evaluated.state == JobState.succeeded, evaluated.error
    assert evaluated.evaluation["images"] == 32


def test_an_earlier_attempts_final_pt_goes_when_the_final_weights_are_the_best(
        root_with_data, tiny_config):
    """An attempt stopped after storing final.pt, resumed: the finished job keeps one copy."""
    cfg = {**tiny_config, "training": {**tiny_config["training"], "epochs": 1}}
    queue = JobQueue(LocalStorage(root_with_data))
    job_id = queue.submit(validate_config(cfg)).job_id
    stray = root_with_data / JobPaths(job_id).final_weights
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"an earlier attempt's copy")
    Worker(queue, WorkerIdentity("w1"), WorkerOptions(exit_when_idle=True)).run()
    result = Result.from_json((root_with_data / JobPaths(job_id).result).read_bytes())
    assert result.state == JobState.succeeded, result.error
    assert result.final_weights_sha256 == result.best_weights_sha256
    assert not stray.exists()


def test_a_finished_job_whose_best_epoch_was_earlier_keeps_both_within_bound(root_with_data,
                                                                             tiny_config):
    result = _trained(root_with_data, tiny_config, epochs=2, accuracies=[0.9, 0.6])
    assert result.state == JobState.succeeded, result.error
    assert result.best.epoch == 1 and result.final_weights_sha256 != result.best_weights_sha256
    job_dir = root_with_data / "done" / result.job_id
    files, total = _footprint(job_dir)
    weights = (job_dir / "best.pt").stat().st_size
    assert {"best.pt", "final.pt", "model.onnx"} <= files
    assert not [f for f in files if f.startswith("checkpoints/")], files
    assert total <= 3.1 * weights, (total / weights, sorted(files))


def test_final_pt_is_read_from_best_pt_only_when_the_result_beside_it_says_they_are_one():
    from cherry_train.jobqueue.layout import best_for_final

    same = json.dumps({"final_weights_sha256": "a" * 64, "best_weights_sha256": "a" * 64})
    other = json.dumps({"final_weights_sha256": "a" * 64, "best_weights_sha256": "b" * 64})
    for files, asked, found in [
        ({"done/j/result.json": same}, "done/j/final.pt", "done/j/best.pt"),
        ({"done/j/result.json": other}, "done/j/final.pt", None),  # it differs: really gone
        ({"done/j/result.json": same}, "done/j/other.pt", None),  # final.pt only
        ({"done/j/result.json": "not json"}, "done/j/final.pt", None),
        ({"done/j/result.json": "[]"}, "done/j/final.pt", None),
        ({"done/j/result.json": json.dumps({"final_weights_sha256": None,
                                            "best_weights_sha256": None})},
         "done/j/final.pt", None),
        ({}, "done/j/final.pt", None),  # no result: not a finished job's folder
    ]:
        assert best_for_final(asked, files.get) == found, (files, asked)
