"""Real training on tiny images with a tiny model, on the CPU, one thread (real temp dirs:
torch writes through its own C++ file code, which pyfakefs cannot see)."""

from __future__ import annotations

import dataclasses
import errno
import itertools
import json
from pathlib import Path

import pytest
import structlog
import torch
import torchvision

from cherry_train.backoff import Backoff
from cherry_train.jobqueue.claims import WorkerIdentity
from cherry_train.jobqueue.layout import JobPaths
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.schemas import Heartbeat, JobState, Result, validate_config
from cherry_train.storage import LocalStorage
from cherry_train.worker.loop import Worker
from cherry_train.worker.training.model import build_model
from cherry_train.worker.training.train import Seams, Training, validate

REQUIRED_RESULT_FIELDS = ("job_id", "state", "attempts", "best", "epochs_completed",
                          "wall_seconds", "images_per_second", "device", "final_weights_sha256",
                          "best_weights_sha256", "amp", "torch_threads")


def run_job(root, cfg: dict, worker_id="w1", stop_at_step=None, seams=None,
            storage=None) -> Result:
    """Submit `cfg` to a fresh queue on `root` and let one worker run until idle."""
    queue = JobQueue(storage or LocalStorage(root))
    manifest = queue.submit(validate_config(cfg))
    return finish(queue, manifest.job_id, worker_id, stop_at_step, seams)


def finish(queue, job_id, worker_id="w1", stop_at_step=None, seams=None, **options):
    from cherry_train.worker.loop import WorkerOptions

    seams = seams or Seams()
    if stop_at_step is not None:
        seams = dataclasses.replace(seams, step=stopping_at(stop_at_step, seams.step))
    worker = Worker(queue, WorkerIdentity(worker_id),
                    WorkerOptions(exit_when_idle=True, **options), trainer=Training(seams))
    worker.run()
    path = JobPaths(job_id).result
    return Result.from_json(queue.storage.read_bytes(path)) if queue.storage.exists(path) else None


def best_first(seams: Seams | None = None) -> Seams:
    """Validation that makes epoch 1 the best: the final weights differ from best.pt's, so
    final.pt is stored (a job whose last epoch was its best keeps best.pt alone)."""
    told = itertools.chain([0.9], itertools.repeat(0.6))
    return dataclasses.replace(seams or Seams(), validate=lambda job: (0.5, next(told)))


def stopping_at(step_number: int, step):
    """The step seam, asking for a stop (as SIGTERM does) once training reaches this step."""
    def stepped(job, x, y):
        out = step(job, x, y)
        if job.state.global_step + 1 >= step_number:  # the loop counts this step next
            job.stop.set("SIGTERM")
        return out
    return stepped


class RefusingStorage(LocalStorage):
    """A queue folder whose uploads `refuse(path)` turns down with 'No space left' (Drive
    full), for as long as `refusing` holds."""

    def __init__(self, root, refuse):
        super().__init__(root)
        self.refuse, self.refusing = refuse, True

    def upload(self, local, path):
        if self.refusing and self.refuse(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().upload(local, path)


def test_training_learns_and_writes_every_result(root_with_data, tiny_config):
    tiny_config["training"]["epochs"] = 3
    result = run_job(root_with_data, tiny_config)
    assert result.state == JobState.succeeded, result.error
    data = result.model_dump()
    for name in REQUIRED_RESULT_FIELDS:
        assert data[name] is not None, name
    assert result.epochs_completed == 3 and result.steps_completed == 18
    assert result.device.startswith("CPU") and result.amp == "off" and result.torch_threads == 1
    assert len(result.dataset_sha256) == 64
    assert result.data_cache["train"]["files"] == 96 and result.data_cache["val"]["files"] == 32
    assert result.data_cache["train"]["copy_seconds"] >= 0

    job_dir = root_with_data / "done" / result.job_id
    lines = [json.loads(x) for x in (job_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [x for x in lines if x["kind"] == "epoch"]
    assert [x["epoch"] for x in epochs] == [1, 2, 3]  # 1-based, as on the screen
    assert 1 <= result.best.epoch <= 3
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]  # it learns
    assert [x["step"] for x in lines if x["kind"] == "train"] == list(range(2, 19, 2))

    assert (job_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = torch.load(job_dir / "best.pt", weights_only=True)
    model = torchvision.models.resnet18(num_classes=2)
    model.load_state_dict(best)
    from cherry_train.worker.checkpoints.store import weights_sha256

    assert weights_sha256(best) == result.best_weights_sha256
    # final.pt only when the final weights are not best.pt's (the last epoch was not best)
    kept_final = result.final_weights_sha256 != result.best_weights_sha256
    assert (job_dir / "final.pt").exists() == kept_final
    final = torch.load(job_dir / ("final.pt" if kept_final else "best.pt"), weights_only=True)
    assert weights_sha256(final) == result.final_weights_sha256
    assert (job_dir / "config.yaml").is_file() and (job_dir / "manifest.json").is_file()
    import hashlib

    assert set(result.artifacts) == {"config", "metrics", "curves", "best_weights"} | (
        {"final_weights"} if kept_final else set())
    for artifact in result.artifacts.values():  # what `cherry fetch` verifies against
        data = (job_dir / artifact.path).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (artifact.bytes, artifact.sha256)
    # Checkpoints only serve resume: a succeeded job keeps none (keep_after_finish: 0), so
    # what it leaves is about its weight files (best.pt, and final.pt if it differs).
    assert not list((job_dir / "checkpoints").iterdir())
    weights = (job_dir / "best.pt").stat().st_size
    folder = sum(f.stat().st_size for f in job_dir.rglob("*") if f.is_file())
    assert folder <= (2.1 if kept_final else 1.1) * weights, (folder, weights)
    assert not (root_with_data / "queue").exists() or not list((root_with_data / "queue").iterdir())


def test_stopped_job_resumes_from_its_checkpoint_and_finishes(root_with_data, tiny_config):
    queue = JobQueue(LocalStorage(root_with_data))
    job_id = queue.submit(validate_config(tiny_config)).job_id
    assert finish(queue, job_id, stop_at_step=3) is None
    hb = Heartbeat.from_json(queue.storage.read_bytes(JobPaths(job_id).heartbeat))
    assert hb.released and hb.last_checkpoint_step == 3

    result = finish(queue, job_id)  # a restarted worker: same id, new process identity
    assert result.state == JobState.succeeded
    assert result.attempts == 2 and result.epochs_completed == 2 and result.steps_completed == 12
    assert [a.reason for a in result.attempt_history] == ["fresh", "released"]
    assert result.attempt_history[1].checkpoint_at_start == 3
    lines = (root_with_data / "done" / job_id / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(x)["step"] for x in lines if json.loads(x)["kind"] == "train"]
    assert steps == sorted(set(steps)), "no step is logged twice"


def deterministic(cfg: dict, pipeline: str, resident_share: float) -> dict:
    """`cfg` made bit-reproducible through `pipeline` ("gpu", "stream" and "split" run on the
    CPU here: the same logic, CPU kernels)."""
    cfg["deterministic"] = True
    # Its dropout draws from the global RNG: nothing else may (a loader's base seed, say).
    cfg["model"] = {"name": "mobilenet_v3_small", "num_classes": 2}
    cfg["performance"] = {"input_pipeline": pipeline,
                          **({"resident_share": resident_share} if pipeline == "split" else {})}
    return cfg


def straight_and_resumed(roots: list[Path], cfg: dict, stops: tuple[int, ...]):
    """The job run straight through in roots[0], and in roots[1] stopped at each of `stops`
    and finished by a new worker each time: the two results, the second checked to have taken
    one attempt per stop and the same weights to the bit."""
    straight = run_job(roots[0], cfg)
    queue = JobQueue(LocalStorage(roots[1]))
    job_id = queue.submit(validate_config(cfg)).job_id
    for step in stops:
        finish(queue, job_id, stop_at_step=step)
    resumed = finish(queue, job_id)
    assert resumed.attempts == len(stops) + 1
    assert resumed.final_weights_sha256 == straight.final_weights_sha256
    assert resumed.best_weights_sha256 == straight.best_weights_sha256
    assert resumed.best == straight.best
    return straight, resumed


@pytest.mark.parametrize("pipeline", ["workers", "gpu", "stream", "split"])
def test_deterministic_resume_ends_with_identical_weights(tmp_path, cherry_images, tiny_config,
                                                          pipeline):
    roots = []
    for name in ("straight", "interrupted"):
        root = tmp_path / name
        root.mkdir()
        (root / "data").symlink_to(cherry_images, target_is_directory=True)
        roots.append(root)
    # stopped mid-epoch 1 and mid-epoch 2
    straight_and_resumed(roots, deterministic(tiny_config, pipeline, 0.4), stops=(2, 8))


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c["data"].update(train_path="data/nope"), "data.train_path: folder"),
    (lambda c: c["model"].update(num_classes=3), "model.num_classes: is 3, but"),
    (lambda c: c["model"].update(name="resnet5"), "did you mean resnet50"),
    (lambda c: c["model"].update(pretrained="weights/missing.pt"), "does not exist"),
])
def test_a_broken_job_fails_with_a_readable_error(root_with_data, tiny_config, change, message):
    change(tiny_config)
    result = run_job(root_with_data, tiny_config)
    assert result.state == JobState.failed
    assert message in result.error.message
    assert result.error.traceback is None  # the user's to fix, not a bug


def test_development_mode_runs_a_few_batches(root_with_data, tiny_config):
    tiny_config["mode"] = "development"
    tiny_config["training"]["batch_size"] = 4
    result = run_job(root_with_data, tiny_config)
    assert result.state == JobState.succeeded
    assert result.steps_completed == 2 * 8  # 8 batches per epoch, not 96 / 4


def test_weights_file_initialises_all_but_the_head(tmp_path):
    from cherry_train.schemas import ModelConfig
    from cherry_train.worker.training.model import build_model

    torch.manual_seed(0)
    imagenet_like = torchvision.models.resnet18(num_classes=1000)
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": imagenet_like.state_dict()}, path)
    model = build_model(ModelConfig(name="resnet18", num_classes=2, pretrained=str(path)), path)
    assert torch.equal(model.conv1.weight, imagenet_like.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, imagenet_like.layer4[1].bn2.running_var)
    assert model.fc.weight.shape == (2, 512)


def test_pretrained_without_internet_says_what_to_do(monkeypatch):
    from cherry_train.schemas import ModelConfig
    from cherry_train.worker.errors import JobError
    from cherry_train.worker.training.model import build_model

    class Offline:
        class DEFAULT:
            @staticmethod
            def get_state_dict(progress):
                raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models, "get_model_weights", lambda name: Offline)
    with pytest.raises(JobError, match="set model.pretrained to the path of a weights file"):
        build_model(ModelConfig(name="resnet18", num_classes=2, pretrained=True), None)


def test_corrupt_newest_checkpoint_is_skipped(root_with_data, tiny_config):
    queue = JobQueue(LocalStorage(root_with_data))
    job_id = queue.submit(validate_config(tiny_config)).job_id
    finish(queue, job_id, stop_at_step=8)  # checkpoints at 6 and 8
    paths = JobPaths(job_id)
    newest = root_with_data / paths.checkpoint(8)
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    result = finish(queue, job_id)
    assert result.state == JobState.succeeded
    assert result.attempt_history[-1].checkpoint_at_start == 8  # by name...
    lines = (root_with_data / paths.metrics).read_text().splitlines()
    steps = [json.loads(x)["step"] for x in lines if json.loads(x)["kind"] == "train"]
    assert steps == sorted(set(steps))  # ...but resumed from step 6, with metrics cut back


def test_loader_processes_do_not_change_the_data(tmp_path, cherry_images, tiny_config):
    """Augmentation is a function of (seed, epoch, sample), not of which process loaded it."""
    tiny_config["deterministic"] = True
    tiny_config["training"]["epochs"] = 1
    hashes = []
    for workers in (0, 2):
        root = tmp_path / f"w{workers}"
        root.mkdir()
        (root / "data").symlink_to(cherry_images, target_is_directory=True)
        tiny_config["data"]["num_workers"] = workers
        result = run_job(root, tiny_config)
        assert result.state == JobState.succeeded, result.error
        hashes.append(result.final_weights_sha256)
    assert hashes[0] == hashes[1]


def test_a_job_survives_a_flaky_queue_root(root_with_data, tiny_config):
    """Errno 107 / EIO on a fifth of the storage calls: retried, logged, never a failed job."""
    from flaky import FlakyStorage

    from cherry_train.storage import RetryingStorage

    flaky = FlakyStorage(root_with_data, rate=0.2, seed=4)
    queue = JobQueue(RetryingStorage(flaky, sleep=lambda s: None))
    job_id = queue.submit(validate_config(tiny_config)).job_id
    result = finish(queue, job_id)
    assert result.state == JobState.succeeded, result.error
    assert result.attempts == 1
    assert flaky.failures >= 5


def test_the_same_data_gives_the_same_dataset_hash(root_with_data, tiny_config):
    tiny_config["training"]["epochs"] = 1
    first = run_job(root_with_data, tiny_config)
    second = run_job(root_with_data, tiny_config)
    assert first.dataset_sha256 == second.dataset_sha256
    assert second.data_cache["train"]["copied_files"] == 0  # reused across jobs


def fit_only(images: int, when=lambda: True) -> Seams:
    """Seams whose models raise CUDA out of memory for more than `images` at once in training
    (while `when()`): a small GPU, on the CPU."""
    def build_small_gpu_model(*args):
        model = build_model(*args)
        real_forward = model.forward

        def forward(x):
            if x.shape[0] > images and model.training and when():
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real_forward(x)
        model.forward = forward
        return model

    return Seams(build_model=build_small_gpu_model)


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_effective_batch(
        root_with_data, tiny_config):
    """An injected CUDA OOM for more than 4 images at once: the job still trains every step of
    batch 16, as 4 micro-batches of 4, and says so in its result."""
    result = run_job(root_with_data, tiny_config, seams=fit_only(4))
    assert result.state == JobState.succeeded, result.error
    assert result.steps_completed == 12  # 2 epochs x 96 / 16: the effective batch is kept
    assert result.micro_batch == 4
    assert [b["micro_batch"] for b in result.oom_backoffs] == [8, 4]


def test_out_of_memory_at_the_floor_fails_clearly(root_with_data, tiny_config):
    def build_hopeless_model(*args):
        model = build_model(*args)

        def forward(x):
            raise torch.OutOfMemoryError("CUDA out of memory")
        model.forward = forward
        return model

    result = run_job(root_with_data, tiny_config, seams=Seams(build_model=build_hopeless_model))
    assert result.state == JobState.failed
    assert "out of memory even with micro-batches of 1" in result.error.message
    assert result.error.traceback is None


def test_an_undecodable_image_fails_the_job_naming_the_file(tmp_path, cherry_images,
                                                             tiny_config):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(cherry_images, root / "data")
    broken = sorted((root / "data" / "train" / "good").iterdir())[5]
    broken.write_bytes(b"\xff\xd8 truncated")
    result = run_job(root, tiny_config)
    assert result.state == JobState.failed
    assert broken.name in result.error.message and "does not decode" in result.error.message


def test_each_job_has_its_own_json_log(root_with_data, tiny_config):
    from cherry_train import logs

    logs.configure("json")
    tiny_config["training"]["epochs"] = 1
    queue = JobQueue(LocalStorage(root_with_data))
    job_id = queue.submit(validate_config(tiny_config)).job_id
    finish(queue, job_id, stop_at_step=2)  # attempt 1, released
    result = finish(queue, job_id)  # attempt 2
    lines = [json.loads(x) for x in
             (root_with_data / JobPaths(job_id).log).read_text().splitlines()]
    events = [(x["attempt"], x["event"]) for x in lines]
    assert (1, "job claimed") in events and (1, "job released") in events  # history kept
    assert (2, "resumed from checkpoint") in events and (2, "job finished") in events
    assert all(x["job_id"] == job_id and "timestamp" in x for x in lines)
    log_bytes = (root_with_data / JobPaths(job_id).log).read_bytes()
    assert result.artifacts["log"].bytes == len(log_bytes)


def test_a_quiet_console_still_leaves_a_full_job_log(root_with_data, tiny_config, capsys):
    from cherry_train import logs

    logs.configure("json", "warning")
    tiny_config["training"]["epochs"] = 1
    result = run_job(root_with_data, tiny_config)
    events = [json.loads(x)["event"] for x in
              (root_with_data / JobPaths(result.job_id).log).read_text().splitlines()]
    assert "epoch done" in events and "checkpoint saved" in events
    assert "epoch done" not in capsys.readouterr().err  # the console shows warnings only


@pytest.mark.parametrize("epochs", [1, 2])
def test_checkpoints_that_cannot_be_written_do_not_end_the_job(root_with_data, tiny_config, epochs):
    """Every checkpoint fails (Drive full) and so does the first best.pt: training goes on,
    and best.pt still ends up holding the weights the result names, stored with the next
    epoch's checkpoint (2 epochs) or at the end (1 epoch)."""
    from cherry_train.worker.checkpoints.store import weights_sha256

    best_failures = []

    def drive_full(path):
        if "/checkpoints/" in path or (path.endswith("best.pt") and not best_failures):
            best_failures.append(path)
            return True
        return False

    tiny_config["training"]["epochs"] = epochs
    with structlog.testing.capture_logs() as logs:
        result = run_job(root_with_data, tiny_config,
                         storage=RefusingStorage(root_with_data, drive_full))
    assert result.state == JobState.succeeded, result.error
    assert result.epochs_completed == epochs
    job_dir = root_with_data / "done" / result.job_id
    assert not list((job_dir / "checkpoints").glob("*.pt"))
    best = torch.load(job_dir / "best.pt", weights_only=True)
    assert weights_sha256(best) == result.best_weights_sha256
    failures = [x for x in logs if x["event"].startswith("checkpoint not written")]
    full = "OSError: [Errno 28] No space left on device"
    assert [x["error"] for x in failures] == [full] * epochs


@pytest.mark.parametrize("drive_comes_back", [True, False])
def test_final_weights_that_cannot_be_stored_are_tried_again_before_the_job_fails(
        root_with_data, tiny_config, drive_comes_back):
    """Drive full at the very end: the finished run is worth waiting for. If space comes back
    (someone frees it) the job succeeds; if not, it fails once the wait is over, saying why."""
    from cherry_train.worker.checkpoints.store import weights_sha256

    refused = []

    def drive_full(path):
        if path.endswith("final.pt") and (len(refused) < 2 or not drive_comes_back):
            refused.append(path)
            return True
        return False

    # Long enough for a few tries even on a loaded machine (each saves 43 MB first). Where
    # space never comes back each of the job's attempts waits this long (resumed from the
    # finished state, it only stores the results): a second, against ten minutes for real.
    waits = Backoff(first=0.01, cap=120, give_up_after=60 if drive_comes_back else 1)
    with structlog.testing.capture_logs() as logs:
        result = run_job(root_with_data, tiny_config,
                         seams=best_first(Seams(store_results=waits)),
                         storage=RefusingStorage(root_with_data, drive_full))
    retries = [x for x in logs if x["event"] == "could not store the job's results; trying again"]
    assert retries and {x["file"] for x in retries} == {"final.pt"}
    job_dir = root_with_data / "done" / result.job_id
    if drive_comes_back:
        assert result.state == JobState.succeeded, result.error
        assert len(retries) == 2
        final = torch.load(job_dir / "final.pt", weights_only=True)
        assert weights_sha256(final) == result.final_weights_sha256
        assert Heartbeat.from_json((job_dir / "heartbeat.json").read_bytes()).storage_error \
            is None
    else:
        assert result.state == JobState.failed
        assert "No space left on device" in result.error.message
        assert len(retries) >= 2 and not (job_dir / "final.pt").exists()


def test_a_stop_while_final_weights_cannot_be_stored_hands_the_job_back(root_with_data,
                                                                        tiny_config):
    """SIGTERM while waiting for storage at the end: handed back, not failed; the next attempt
    resumes from the finished state's checkpoint and only stores the results."""
    from cherry_train.worker.loop import WorkerOptions

    def drive_full(path):
        if path.endswith("final.pt"):
            worker.stop.set("SIGTERM")  # the notebook is stopped meanwhile
            return True
        return False

    storage = RefusingStorage(root_with_data, drive_full)
    queue = JobQueue(storage)
    job_id = queue.submit(validate_config(tiny_config)).job_id
    worker = Worker(queue, WorkerIdentity("w1"), WorkerOptions(exit_when_idle=True),
                    trainer=Training(best_first()))
    worker.run()
    paths = JobPaths(job_id)
    assert not (root_with_data / paths.result).exists()  # not failed
    assert Heartbeat.from_json((root_with_data / paths.heartbeat).read_bytes()).released
    storage.refusing = False  # space came back
    with structlog.testing.capture_logs() as logs:
        result = finish(queue, job_id)
    assert result.state == JobState.succeeded and result.attempts == 2
    assert result.steps_completed == 12
    assert not [x for x in logs if x["event"] == "first step"]  # nothing trained again


def test_a_loader_death_during_validation_is_a_loader_death(root_with_data, tiny_config):
    """Validation has loader processes too: one killed there hands the job back as LoaderDied
    (the next attempt uses half as many), not as an unknown error. Seen in the chaos test."""
    queue = JobQueue(LocalStorage(root_with_data))
    job_id = queue.submit(validate_config(tiny_config)).job_id
    calls = []

    def dies_once(job):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")
        return validate(job)
    worker = Worker(queue, WorkerIdentity("w1"), trainer=Training(Seams(validate=dies_once)))
    assert worker.run_once()
    hb = queue.heartbeat(job_id)
    assert hb.released and hb.error.type == "LoaderDied", hb.error
    result = finish(queue, job_id)
    assert result.state == JobState.succeeded
    assert result.attempt_history[1].previous.error.type == "LoaderDied"


def test_the_first_step_says_how_long_it_waited_for_its_batch():
    """`first step` splits its seconds: the wait for the batch (decoding, loader start-up) and
    the step itself; later steps do not move the batch's time."""
    from types import SimpleNamespace
    from unittest import mock

    from structlog.testing import capture_logs

    from cherry_train.worker.training.job import TrainingJob
    from cherry_train.worker.training.progress import first_step

    clock = iter([10.0, 14.5])
    job = SimpleNamespace(clock=lambda: next(clock), attempt_started_at=2.0, first_batch_at=None,
                          mid_step=False, first_step_done=False, reporter=mock.Mock(),
                          state=SimpleNamespace(epoch=0, global_step=1))
    TrainingJob.begin_step(job)  # the first batch has come: 8 s after set-up
    assert job.mid_step and job.first_batch_at == 10.0
    TrainingJob.begin_step(job)  # another step (no clock read)
    with capture_logs() as events:
        first_step(job)
    said = [e for e in events if e["event"] == "first step"]
    assert said == [{"event": "first step", "log_level": "info", "seconds": 12.5,
                     "first_batch_seconds": 8.0}]
