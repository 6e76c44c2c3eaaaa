"""TensorBoard event files per job: what TensorBoard's own reader sees, after a kill and a
resume too (no step twice, none out of order), the config as hparams, and `cherry tensorboard`."""

from __future__ import annotations

import pytest

from cherry_train.jobqueue.layout import JobPaths
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.schemas import JobState, Result, validate_config
from cherry_train.storage import LocalStorage
from cherry_train.worker.reporting.tensorboard import Board

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator")


def scalars(folder, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a tag, as TensorBoard shows it (orphaned steps purged)."""
    acc = event_accumulator.EventAccumulator(str(folder), purge_orphaned_data=True)
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_a_resumed_attempt_purges_the_steps_logged_past_its_checkpoint(tmp_path):
    """Attempt 1 logged steps 2, 4, 6 and was killed after its checkpoint at step 4; attempt 2
    resumes there and logs 6 and 8 again: TensorBoard shows 2, 4, 6, 8, attempt 2's 6."""
    stored = tmp_path / "stored"
    stored.mkdir()

    def upload(local, path):
        (stored / path.rsplit("/", 1)[-1]).write_bytes(local.read_bytes())

    first = Board(tmp_path / "a1", "tb", upload, {"seed": 1}, purge_step=None)
    for step in (2, 4, 6):
        first.add({"kind": "train", "step": step, "loss": 1.0 / step, "lr": 0.1})
    first.store()
    first.close()
    second = Board(tmp_path / "a2", "tb", upload, {"seed": 1}, purge_step=5)
    for step in (6, 8):
        second.add({"kind": "train", "step": step, "loss": 0.5 / step, "lr": 0.1})
    second.store()
    second.close()
    assert len(list(stored.iterdir())) == 2  # a file per attempt
    assert scalars(stored, "train/loss") == [(2, 0.5), (4, 0.25), (6, pytest.approx(0.5 / 6)),
                                             (8, 0.0625)]


def test_a_job_leaves_event_files_with_every_metric_and_its_config(root_with_data,
                                                                   tiny_config):
    from tests.test_training import run_job

    tiny_config["tensorboard"] = True
    result = run_job(root_with_data, tiny_config)
    assert result.state == JobState.succeeded
    folder = root_with_data / JobPaths(result.job_id).tensorboard
    assert [s for s, _ in scalars(folder, "train/loss")] == list(range(2, 13, 2))
    assert [s for s, _ in scalars(folder, "epoch/val_accuracy")] == [6, 12]
    assert [v for _, v in scalars(folder, "best/val_accuracy")][-1] == \
        pytest.approx(result.best.val_accuracy)
    acc = event_accumulator.EventAccumulator(str(folder))
    acc.Reload()
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert info.hparams["training.learning_rate"].number_value == pytest.approx(0.003)
    assert info.hparams["model.name"].string_value == "resnet18"


@pytest.mark.slow
def test_event_files_after_a_kill_and_a_resume_show_each_step_once(tmp_path, cherry_images,
                                                                   tiny_config):
    """A real worker SIGKILLed after it stored steps past its newest checkpoint; the restarted
    worker resumes from that checkpoint: TensorBoard's reader sees every step once, in order."""
    from tests.test_crash import killed_then_restarted, make_root

    root = make_root(tmp_path, cherry_images, "root")
    cfg = {**tiny_config, "checkpoint": {"every_steps": 4, "keep_last": 3}, "tensorboard": True}
    queue = JobQueue(LocalStorage(root))
    job_id = queue.submit(validate_config(cfg)).job_id
    paths = JobPaths(job_id)

    def logged_past_a_checkpoint():
        lines = (root / paths.metrics).read_text().splitlines() if \
            (root / paths.metrics).exists() else []
        return any('"step":6' in line for line in lines) and \
            (root / paths.checkpoint_checksum(4)).exists()

    slow = {"CHERRY_SLOW": "decode:0.02"}  # a third of a second a step: time to kill in
    second = killed_then_restarted(root, tmp_path / "journal", logged_past_a_checkpoint,
                                   "step 6 logged", env=slow)
    assert second.wait(timeout=150) == 0
    result = Result.from_json((root / paths.result).read_bytes())
    assert result.state == JobState.succeeded and result.attempts == 2
    # Killed after step 6 was stored: resumed from 4 (or from 8, had it got that far).
    assert result.attempt_history[1].checkpoint_at_start in (4, 8)
    folder = root / paths.tensorboard
    assert len(list(folder.iterdir())) == 2
    assert [s for s, _ in scalars(folder, "train/loss")] == list(range(2, 13, 2))


def test_cherry_tensorboard_shows_a_mount_root_in_place_and_copies_an_api_root(tmp_path,
                                                                              capsys):
    from cherry_train.cli import main
    from cherry_train.client.boards import synced_logdir
    from cherry_train.testing.fakedrive import FakeDrive
    from cherry_train.testing.fakehttp import fake_drive_storage

    (tmp_path / "root" / "done").mkdir(parents=True)
    assert main(["tensorboard", "--root", str(tmp_path / "root"), "--logdir-only"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "root" / "done")

    queue = JobQueue(fake_drive_storage(FakeDrive()))
    queue.storage.write_atomic("done/job-a/tensorboard/events.out.1", b"first")
    queue.storage.write_atomic("done/job-b/result.json", b"{}")  # no events: nothing copied
    copy = synced_logdir(queue, tmp_path / "copy")
    assert (copy / "job-a" / "tensorboard" / "events.out.1").read_bytes() == b"first"
    assert not (copy / "job-b").exists()
    queue.storage.write_atomic("done/job-a/tensorboard/events.out.1", b"first, and more")
    synced_logdir(queue, tmp_path / "copy")  # again: what grew comes again
    assert (copy / "job-a" / "tensorboard" / "events.out.1").read_bytes() == b"first, and more"
