"""One job over several ranks (torch.distributed): on this machine two CPU processes with gloo, the
same code path as NCCL over GPUs. Every rank's share of the data, an exact resume, and a rank
killed with SIGKILL while the job trains, and SIGTERM to the whole process group."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import signal
from pathlib import Path

import pytest
import torch

from cherry_train.jobqueue.claims import WorkerIdentity
from cherry_train.jobqueue.layout import JobPaths
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.schemas import Result, validate_config
from cherry_train.storage import LocalStorage
from cherry_train.worker.inputs.samples import EpochSampler
from cherry_train.worker.loop import Worker, WorkerOptions
from cherry_train.worker.multigpu.distributed import world_size
from cherry_train.worker.training.train import Seams, Training
from tests.test_training import stopping_at


def test_each_rank_takes_its_share_of_every_global_batch():
    """Two ranks see exactly the batches one process would, split in halves, from any resume
    point on; a last short batch (validation) is split as far as it goes."""
    whole = EpochSampler(20, seed=5, shuffle=True, stop=16)
    ranks = [EpochSampler(20, seed=5, shuffle=True, stop=16, shard=(r, 2, 8)) for r in (0, 1)]
    for start in (0, 8):  # a fresh epoch, and a resume after one global batch
        for s in [whole, *ranks]:
            s.set_position(3, start)
        one = [i for _, i in whole]
        shares = [[i for _, i in s] for s in ranks]
        assert [len(s) for s in ranks] == [len(x) for x in shares] == [(16 - start) // 2] * 2
        for b in range(0, len(one), 8):  # each global batch: rank 0's half, then rank 1's
            assert one[b:b + 8] == shares[0][b // 2:b // 2 + 4] + shares[1][b // 2:b // 2 + 4]
    val = [EpochSampler(10, seed=5, shuffle=False, shard=(r, 2, 8)) for r in (0, 1)]
    assert [[i for _, i in s] for s in val] == [[0, 1, 2, 3, 8, 9], [4, 5, 6, 7]]


def test_the_ranks_are_the_gpus_asked_for_and_split_the_batch_evenly():
    cpu = torch.device("cpu")
    assert world_size(None, cpu, 16) == 1  # on the CPU only when asked
    assert world_size(2, cpu, 16) == 2
    assert world_size(4, cpu, 6) == 3  # 6 images do not split over 4: 3 ranks of 2


def two_ranks(tiny_config) -> dict:
    """MobileNetV3-small: its dropout draws on every rank, so an exact resume also proves each
    rank's randomness is drawn again the same."""
    cfg = {**tiny_config, "deterministic": True, "lease_seconds": 60,
           "model": {"name": "mobilenet_v3_small", "num_classes": 2}}
    cfg["training"] = {**cfg["training"], "batch_size": 16}
    return cfg


def run(queue: JobQueue, job_id: str, seams: Seams | None = None) -> Result | None:
    worker = Worker(queue, WorkerIdentity("w1"), WorkerOptions(exit_when_idle=True, gpus=2),
                    trainer=Training(seams or Seams()))
    worker.run()
    path = JobPaths(job_id).result
    return Result.from_json(queue.storage.read_bytes(path)) if queue.storage.exists(path) else None


def new_root(tmp_path, cherry_images, name: str) -> JobQueue:
    root = tmp_path / name
    root.mkdir()
    (root / "data").symlink_to(cherry_images, target_is_directory=True)
    return JobQueue(LocalStorage(root))


@pytest.mark.parametrize("pipeline", ["workers", pytest.param("gpu", marks=pytest.mark.long),
                                      pytest.param("stream", marks=pytest.mark.long)])
def test_two_ranks_train_one_job_and_resume_it_exactly(tmp_path, cherry_images, tiny_config,
                                                       pipeline):
    """Uninterrupted on two ranks, and stopped twice (mid-epoch 1, mid-epoch 2) then resumed on
    two ranks: the same final and best weights, bit for bit. ("gpu" and "stream": the GPU
    input pipelines' logic, run on the CPU here.)"""
    cfg = validate_config({**two_ranks(tiny_config),
                           "performance": {"input_pipeline": pipeline}})
    straight_queue = new_root(tmp_path, cherry_images, "straight")
    straight = run(straight_queue, straight_queue.submit(cfg).job_id)
    assert straight.state.value == "succeeded" and straight.ranks == 2
    assert straight.device.startswith("2x CPU") and straight.epochs_completed == 2
    assert straight.best.val_accuracy > 0  # validation over both ranks' shares
    queue = new_root(tmp_path, cherry_images, "interrupted")
    job_id = queue.submit(cfg).job_id
    assert run(queue, job_id, Seams(step=stopping_at(2, Seams().step))) is None
    assert run(queue, job_id, Seams(step=stopping_at(8, Seams().step))) is None
    resumed = run(queue, job_id)
    assert resumed.attempts == 3 and resumed.rank_changes == []
    assert resumed.final_weights_sha256 == straight.final_weights_sha256
    assert resumed.best_weights_sha256 == straight.best_weights_sha256


def killing_rank_1_at(step_number: int):
    """The step seam: SIGKILL rank 1 (a real process) once rank 0 reaches this step."""
    def stepped(job, x, y):
        out = Seams().step(job, x, y)
        if job.state.global_step + 1 == step_number and job.claim.attempt.n == 1:
            follower = job.group.followers[0]
            os.kill(follower.pid, signal.SIGKILL)
            follower.join(timeout=30)
        return out
    return stepped


def test_a_killed_rank_hands_the_job_back_and_it_resumes(tmp_path, cherry_images, tiny_config):
    queue = new_root(tmp_path, cherry_images, "root")
    job_id = queue.submit(validate_config(two_ranks(tiny_config))).job_id
    # The attempt ends on rank 0 too; the worker's next poll resumes the job on two ranks.
    result = run(queue, job_id, Seams(step=killing_rank_1_at(3)))
    assert result is not None and result.state.value == "succeeded", result
    assert result.attempts == 2 and result.ranks == 2
    second = result.attempt_history[1]
    assert second.reason.value == "after-error"
    assert "rank 1" in second.previous.error.message
    assert second.checkpoint_at_start == 3  # the state between two steps was kept


def test_a_rank_that_fails_says_why_in_the_jobs_history(tmp_path, cherry_images, tiny_config,
                                                        monkeypatch):
    """Rank 1 raises while it sets up, at every attempt: each attempt ends on rank 0 with rank
    1's own error in the history, and the crash loop ends the job with it."""
    monkeypatch.setenv("CHERRY_FAULT", "follower-setup:raise")  # spawned ranks inherit it
    queue = new_root(tmp_path, cherry_images, "root")
    job_id = queue.submit(validate_config({**two_ranks(tiny_config), "max_attempts": 2})).job_id
    result = run(queue, job_id)
    assert result.state.value == "failed" and result.attempts == 2
    said = result.attempt_history[1].previous.error.message
    assert said.startswith("rank 1 (pid ") and "InjectedFault: a fault injected at " \
        "follower-setup" in said, said


def test_a_rank_failing_for_the_jobs_own_fault_fails_the_job():
    """A follower's JobError (out of memory at this batch size, say) fails the job on rank 0
    too; anything else hands it back."""
    from cherry_train.worker.errors import JobError
    from cherry_train.worker.multigpu.distributed import Group, RankDied

    exited = "rank 1 (pid 7) exited with code 1"
    own = Group.failure(exited, {"error": "JobError: out of memory at 128 images", "job": True})
    assert isinstance(own, JobError) and str(own) == f"{exited}: out of memory at 128 images"
    other = Group.failure(exited, {"error": "OSError: x", "job": False})
    assert isinstance(other, RankDied) and "OSError: x" in str(other)
    assert isinstance(Group.failure("rank 1 (pid 7) exited with code -9", None), RankDied)


def test_a_resume_on_another_number_of_ranks_continues_and_says_so(tmp_path, cherry_images,
                                                                   tiny_config):
    queue = new_root(tmp_path, cherry_images, "root")
    job_id = queue.submit(validate_config(two_ranks(tiny_config))).job_id
    assert run(queue, job_id, Seams(step=stopping_at(3, Seams().step))) is None
    worker = Worker(queue, WorkerIdentity("w1"), WorkerOptions(exit_when_idle=True, gpus=1),
                    trainer=Training(dataclasses.replace(Seams())))
    worker.run()
    result = Result.from_json(queue.storage.read_bytes(JobPaths(job_id).result))
    assert result.state.value == "succeeded" and result.ranks == 1
    assert result.rank_changes == [{"step": 3, "from": 2, "to": 1}]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_sigterm_to_the_process_group_stops_every_rank_and_hands_the_job_back(tmp_path,
                                                                             cherry_images):
    """A real worker with two ranks, its whole process group signalled (as Colab and docker
    stop a runtime): the ranks agree to stop, rank 0 checkpoints and hands the job back, and
    no process of the group is left."""
    from tests.test_crash import CRASH_CONFIG, heartbeat, kill, make_root, start_worker, wait_for

    root = make_root(tmp_path, cherry_images, "root")
    cfg = {**CRASH_CONFIG, "lease_seconds": 60, "checkpoint": {"every_minutes": 60},
           "training": {"epochs": 200, "batch_size": 8, "learning_rate": 0.002}}
    job_id = JobQueue(LocalStorage(root)).submit(validate_config(cfg)).job_id
    proc = start_worker(root, "a", tmp_path / "j.jsonl", own_group=True, args=("--gpus", "2"))
    try:
        wait_for(lambda: (hb := heartbeat(root, job_id)) and hb.step >= 3, 100,
                 "two ranks training")
        assert heartbeat(root, job_id).device.startswith("2x CPU")
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        wait_for(lambda: not group_alive(proc.pid), 30, "the other rank to exit")
    finally:
        kill(proc)
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    hb = heartbeat(root, job_id)
    assert hb.released and hb.last_checkpoint_step >= 3
    assert (root / JobPaths(job_id).checkpoint(hb.last_checkpoint_step)).is_file()


# -- what the group exposes -------------------------------------------------------------------

def listening(pids: list[int]) -> list[str]:
    """The local addresses (hex, as /proc/net/tcp{,6} has them) these processes listen on."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd) if fd.is_symlink() else ""
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                found.append(cols[1].split(":")[0])
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


def follow_and_wait(spec) -> None:
    """A follower that only joins, takes rank 0's state, says what it got and waits."""
    from cherry_train.worker.multigpu.distributed import Group

    group = Group(spec.rank, spec.ranks, torch.device("cpu"), spec.timeout_seconds)
    group.join_as_follower(spec.port)
    try:
        shared = group.share_state(None)
        group.store.set("test/shared", json.dumps({"w": shared["w"].tolist(), **shared["state"]}))
        group.agree(False)
    finally:
        group.close(finished=True)


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's socket tables")
def test_the_ranks_listen_on_the_loopback_only(monkeypatch):
    """The store once listened on every interface (`*:port` in `ss`), and gloo listens where
    the host name resolves (a network address on many hosts; here set to one): anyone on the
    network could have joined the group. Every listening socket of every rank is loopback."""
    from cherry_train.worker.multigpu.distributed import Group, RankSpec

    network = sorted(n for n in os.listdir("/sys/class/net") if n != "lo")
    if network:  # a host whose host name resolves to its network address
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", network[0])
    monkeypatch.delenv("NCCL_SOCKET_IFNAME", raising=False)
    group = Group(0, 2, torch.device("cpu"), 60)
    group.start(follow_and_wait, lambda rank, port: RankSpec(
        rank, 2, port, "cpu", b"", "", "", None, 60, os.getpid(), 1))
    try:
        group.share_state({"w": torch.arange(3.0), "state": {"epoch": 2, "best": None}})
        addresses = listening([os.getpid(), *(p.pid for p in group.followers)])
        group.agree(False)
        shared = json.loads(group.store.get("test/shared"))
    finally:
        group.close(finished=True)
    assert shared == {"w": [0.0, 1.0, 2.0], "epoch": 2, "best": None}
    assert len(addresses) >= 2 and set(addresses) <= LOOPBACK, addresses
    assert os.environ["NCCL_SOCKET_IFNAME"] == "lo"  # NCCL's bootstrap (on GPUs), likewise


class Planted:
    """What a pickle can carry besides tensors: a call, made as it is loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_shared_state_is_loaded_weights_only_and_a_pickled_object_is_refused(tmp_path):
    from cherry_train.worker.multigpu.distributed import load_state

    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.ones(2)}, "state": {"epoch": 1}}, buffer)
    assert load_state(buffer.getvalue(), torch.device("cpu"))["state"] == {"epoch": 1}
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.ones(2)}, "x": Planted(tmp_path / "ran")}, buffer)
    with pytest.raises(pickle.UnpicklingError):
        load_state(buffer.getvalue(), torch.device("cpu"))
    assert not (tmp_path / "ran").exists()
