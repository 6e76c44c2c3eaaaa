"""A job's `requires:` (device, gpus, gpu_memory_gb, bf16): validated at submit, matched by each
worker before the claim (never an attempt for a job it cannot run), and named by `cherry status`
when no live worker meets it."""

from __future__ import annotations

import pytest
import yaml

from cherry_train.cli import main
from cherry_train.jobqueue.claims import WorkerIdentity
from cherry_train.jobqueue.clock import FakeClock
from cherry_train.jobqueue.layout import JobPaths
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.schemas import WorkerState, WorkerStatus, validate_config
from cherry_train.schemas.requires import Capabilities, RequiresSection
from cherry_train.storage import LocalStorage
from cherry_train.worker.checkpoints.state import TrainState
from cherry_train.worker.loop import Worker, WorkerOptions
from cherry_train.worker.outcome import Outcome

CPU = Capabilities(device="cpu")
T4 = Capabilities(device="cuda", gpu_name="Tesla T4", gpu_memory_gb=15.8, bf16=False, gpus=1)
L4 = Capabilities(device="cuda", gpu_name="NVIDIA L4", gpu_memory_gb=23.7, bf16=True, gpus=1)


def done(run) -> Outcome:
    return Outcome(completed=True, state=TrainState(epoch=1, global_step=1), device="fake",
                   precision="off", threads=1)


@pytest.mark.parametrize("requires, has, unmet", [
    ({}, CPU, []),
    ({"device": "cuda"}, CPU, ["device cuda"]),
    ({"device": "cuda"}, T4, []),
    ({"gpu_memory_gb": 24}, T4, ["gpu_memory_gb >= 24"]),
    ({"gpu_memory_gb": 24}, L4, []),  # a "24 GB" card reports a little less
    ({"gpu_memory_gb": 16}, T4, []),
    ({"gpu_memory_gb": 24}, CPU, ["gpu_memory_gb >= 24"]),
    ({"bf16": True}, T4, ["bf16"]),
    ({"bf16": True}, L4, []),
    ({"gpus": 2}, L4, ["gpus >= 2"]),
    ({"gpus": 2, "bf16": True}, L4.model_copy(update={"gpus": 2}), []),
    ({"device": "cpu"}, T4, ["device cpu"]),
])
def test_requirements_against_what_a_worker_has(requires, has, unmet):
    assert RequiresSection(**requires).unmet(has) == unmet


def test_a_cpu_worker_never_claims_a_cuda_job_and_a_gpu_worker_does(tmp_path, tiny_config):
    queue = JobQueue(LocalStorage(tmp_path / "root"), FakeClock())
    cuda = queue.submit(validate_config({**tiny_config, "name": "cuda", "priority": 5,
                                         "requires": {"device": "cuda"}}))
    plain = queue.submit(validate_config({**tiny_config, "name": "plain"}))
    ran = []

    def trainer(run):
        ran.append(run.claim.job_id)
        return done(run)

    cpu = Worker(queue, WorkerIdentity("cpu-1"), WorkerOptions(
        exit_when_idle=True, poll_min_seconds=0.01, capabilities=CPU), trainer=trainer)
    assert cpu.run() == 0
    assert ran == [plain.job_id]
    assert not (tmp_path / "root" / JobPaths(cuda.job_id).dir).exists()  # no attempt, no folder
    assert queue.worker_status("cpu-1").capabilities == CPU  # published for `cherry status`
    gpu = Worker(queue, WorkerIdentity("colab-1"), WorkerOptions(
        exit_when_idle=True, poll_min_seconds=0.01, capabilities=T4), trainer=trainer)
    assert gpu.run() == 0
    assert ran == [plain.job_id, cuda.job_id]
    assert [a.worker_id for a in queue.attempts(cuda.job_id)] == ["colab-1"]


def test_status_names_what_no_live_worker_has(tmp_path, tiny_config, capsys):
    root = tmp_path / "root"
    queue = JobQueue(LocalStorage(root))

    def worker(worker_id, has, state=WorkerState.idle):
        queue.write_worker_status(WorkerStatus(worker_id=worker_id, incarnation="x",
                                               at=queue.clock.now(), state=state,
                                               capabilities=has))

    job = queue.submit(validate_config({**tiny_config, "requires": {"gpu_memory_gb": 24}}))
    worker("colab-1", T4)
    worker("old-a100", L4.model_copy(update={"gpu_memory_gb": 42.4}), WorkerState.stopped)
    assert main(["status", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert (f"! {job.job_id}: waiting: no worker with gpu_memory_gb >= 24 "
            "(colab-1: 1x Tesla T4 15.8 GB)") in out
    assert "colab-1 (idle, 1x Tesla T4 15.8 GB, seen" in out
    worker("colab-2", L4)  # one live worker that can: no longer waiting for a worker
    assert main(["status", "--root", str(root)]) == 0
    assert "waiting:" not in capsys.readouterr().out
    assert main(["status", "--root", str(root), "--json"]) == 0
    assert '"waiting": null' in capsys.readouterr().out
    # The worker that could run it drains: it takes no new job, so the job waits again.
    worker("colab-2", L4, WorkerState.draining)
    assert main(["status", "--root", str(root)]) == 0
    assert (f"! {job.job_id}: waiting: no worker with gpu_memory_gb >= 24 "
            "(colab-1: 1x Tesla T4 15.8 GB)") in capsys.readouterr().out
    worker("colab-1", T4, WorkerState.draining)
    assert main(["status", "--root", str(root)]) == 0
    assert f"! {job.job_id}: waiting: every live worker is draining" in capsys.readouterr().out


@pytest.mark.parametrize("requires, message", [
    ({"gpus": 0}, "requires.gpus"),
    ({"gpu_memory_gb": -1}, "requires.gpu_memory_gb"),
    ({"gpu_memory": 24}, "requires.gpu_memory"),
    ({"device": "tpu"}, "requires.device"),
    ({"device": "cpu", "bf16": True}, "contradict device: cpu"),
])
def test_an_impossible_requirement_is_one_line_at_submit_and_queues_nothing(
        tmp_path, tiny_config, capsys, requires, message):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({**tiny_config, "requires": requires}))
    root = tmp_path / "root"
    assert main(["submit", str(cfg), "--root", str(root), "--no-preflight"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not (root / "queue").exists() or not list((root / "queue").iterdir())


def test_the_worker_measures_what_it_has(monkeypatch):
    from cherry_train.worker.training.device import capabilities

    monkeypatch.setenv("CHERRY_DEVICE", "cpu")
    assert capabilities() == CPU


def test_a_t4_has_no_bf16_although_torch_emulates_it(monkeypatch):
    """torch.cuda.is_bf16_supported() is True on a T4 (compute capability 7.5), where bf16 is
    emulated: amp: auto must pick fp16 there, and a job requiring bf16 must not land there."""
    from types import SimpleNamespace

    import torch

    from cherry_train.schemas.config import Amp
    from cherry_train.worker.training import device

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(device, "pick_device", lambda: gpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for capability, name, memory, bf16 in [((7, 5), "Tesla T4", 15.8e9, False),
                                           ((8, 9), "NVIDIA L4", 23.7e9, True)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda *a, n=name, m=memory: SimpleNamespace(name=n, total_memory=m))
        assert device.capabilities().bf16 is bf16, name
        assert device.resolve_precision(Amp.auto, gpu).name == ("bf16" if bf16 else "fp16")


def test_a_job_that_requires_nothing_is_written_as_before(tmp_path, tiny_config):
    """Workers of earlier versions reject unknown keys: without this every new manifest would
    be moved to failed/ by them, not only those that use `requires:`."""
    queue = JobQueue(LocalStorage(tmp_path / "root"), FakeClock())
    plain = queue.submit(validate_config(tiny_config))
    assert b"requires" not in (tmp_path / "root" / JobPaths(plain.job_id).queued_manifest
                               ).read_bytes()
    needs = queue.submit(validate_config({**tiny_config, "requires": {"bf16": True}}))
    assert queue.manifest(needs.job_id).config.requires.bf16 is True  # kept where it is set
