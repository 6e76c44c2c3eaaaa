"""The compile decision: fixed where no timing is needed, else by measured pay-back."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cherry_train.worker.checkpoints.kernelseal import KernelSeal
from cherry_train.worker.training import compiling
from cherry_train.worker.training.train import Seams

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
KEY = b"the workers' own key, 32 chars.."  # what $CHERRY_KERNEL_KEY gives every worker


class FakeCompiler(compiling.TorchCompiler):
    """Decides to compile at once and 'compiles' to the model itself (nothing compiles on a
    CPU); keys, packs and unpacks kernels as the test says."""

    def __init__(self, pack, unpack, key=lambda mode, micro, device: {"mode": mode},
                 compile=lambda model, micro: (model, "default")):
        self.key, self.pack, self.unpack, self.compile = key, pack, unpack, compile

    @staticmethod
    def decide(*args):
        return True, "test"


def test_fixed_decisions():
    assert compiling.fixed_decision("off", CUDA, False)[0] is False
    assert compiling.fixed_decision("on", CPU, False)[0] is False  # no compiling on the CPU
    assert compiling.fixed_decision("auto", CUDA, True)[0] is False  # deterministic
    assert compiling.fixed_decision("on", CUDA, False)[0] is True
    assert compiling.fixed_decision("auto", CUDA, False) is None  # time it first


def test_a_long_job_compiles_and_a_short_one_does_not():
    # ResNet-50 at batch 256 on an H100: about 66 ms a step eager, 1.39x faster compiled. Ten
    # minutes of training save more than compiling costs; two minutes do not.
    assert compiling.pays_back(10_000, 0.066, 256)[0] is True
    assert compiling.pays_back(20 * 78, 0.066, 256)[0] is False
    # At batch 32, CUDA graphs save most of each step: six minutes of training is enough.
    assert compiling.pays_back(12_500, 0.020, 32)[0] is True
    assert compiling.pays_back(1_250, 0.020, 32)[0] is False
    assert compiling.mode_for(32) == "reduce-overhead" and compiling.mode_for(256) == "default"


def test_each_job_compiles_a_static_graph_in_a_long_lived_worker():
    # A worker process trains job after job. Without a reset, dynamo's caches (per code object,
    # shared by every ResNet) make the second job's graph symbolic in the batch dimension.
    graphs = []

    def record(gm, example_inputs, **kwargs):
        images = [t for t in example_inputs if isinstance(t, torch.Tensor) and t.dim() == 4
                  and t.shape[1] == 3 and t.shape[-1] == 32]
        graphs.append({"images": [tuple(t.shape) for t in images],
                       "symbolic": [t for t in example_inputs if isinstance(t, torch.SymInt)]})
        return gm.forward

    import torchvision

    for batch in (4, 8, 6):  # three jobs, three batch sizes
        model = torchvision.models.resnet18(num_classes=2)
        compiled, mode = compiling.compile_model(model, batch, backend=record)
        assert mode == "reduce-overhead"
        out = compiled(torch.randn(batch, 3, 32, 32))
        assert out.shape == (batch, 2)
    assert [g["images"] for g in graphs] == [[(4, 3, 32, 32)], [(8, 3, 32, 32)], [(6, 3, 32, 32)]]
    assert all(not g["symbolic"] for g in graphs)


def test_packed_kernels_are_loaded_only_into_the_same_set_up(monkeypatch):
    saved, loaded = b"\x00inductor artifacts\n\xff", []
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (saved, None))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", loaded.append)
    key = {"torch": "2.11", "device": "NVIDIA H100", "mode": "default", "micro_batch": 256}
    packed = compiling.pack_kernels(key)
    assert compiling.unpack_kernels(packed, {**key, "device": "Tesla T4"}).startswith(
        "compiled for another set-up")
    assert compiling.unpack_kernels(b"something else", key) == "not a compiled-kernels file"
    assert loaded == []
    assert compiling.unpack_kernels(packed, dict(reversed(key.items()))) is None
    assert loaded == [saved]  # the artifacts' bytes, unchanged


def test_nothing_compiled_packs_nothing(monkeypatch):
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: None)
    assert compiling.pack_kernels({"mode": "default"}) is None


def test_stored_kernels_make_compiling_pay_back_sooner():
    # 3,000 steps left at 66 ms: 56 s saved. Not worth a cold compile; worth a warm one.
    assert compiling.pays_back(3_000, 0.066, 256)[0] is False
    assert compiling.pays_back(3_000, 0.066, 256, warm=True)[0] is True


def test_compiled_kernels_reach_the_resumed_attempt_and_go_at_the_end(root_with_data,
                                                                      tiny_config, monkeypatch):
    # Nothing compiles on the CPU: the seams are the compile decision and torch's cache calls.
    from cherry_train.jobqueue.layout import JobPaths
    from cherry_train.jobqueue.lifecycle import JobQueue
    from cherry_train.schemas import JobState, validate_config
    from cherry_train.storage import LocalStorage
    from tests.test_training import finish

    packed, loaded = [], []

    def pack(key):
        packed.append(key)
        return f"kernels {len(packed)}".encode()

    def unpack(data, key):
        loaded.append(data)
        return None

    seams = Seams(compiler=FakeCompiler(pack, unpack))
    from cherry_train.worker.reporting.reporter import Reporter

    phases, update = [], Reporter.update

    def record_phase(self, **progress):
        if "phase" in progress and (not phases or phases[-1] != progress["phase"]):
            phases.append(progress["phase"])
        update(self, **progress)

    monkeypatch.setattr(Reporter, "update", record_phase)
    queue = JobQueue(LocalStorage(root_with_data))
    job_id = queue.submit(validate_config(tiny_config)).job_id
    kernels = root_with_data / JobPaths(job_id).compiled_kernels
    assert finish(queue, job_id, stop_at_step=3, seams=seams,
                  kernel_seal=KernelSeal(KEY)) is None
    # Stored with the checkpoint it was packed for, signed for this job.
    assert KernelSeal(KEY).verify(kernels.read_bytes(), job_id) == b"kernels 1"
    # What `cherry status` shows: the first step runs eager (it decides), the next compiles.
    assert phases[:5] == ["copying data", "starting", "training", "compiling", "training"]
    result = finish(queue, job_id, seams=seams, kernel_seal=KernelSeal(KEY))  # another worker
    assert result.state == JobState.succeeded and result.attempts == 2
    assert loaded == [b"kernels 1"] and packed == [{"mode": "default"}]  # nothing new to pack
    assert not kernels.exists()  # a finished job keeps no kernels
    assert "compiled_kernels" not in result.artifacts


def test_without_a_key_kernels_are_neither_stored_nor_loaded_and_the_worker_says_so_once(
        root_with_data, tiny_config):
    # They are code: a worker without the key of its root's workers cannot tell its own
    # kernels from anyone's, so it keeps none and loads none, even a validly signed file.
    import structlog

    from cherry_train.jobqueue.layout import JobPaths
    from cherry_train.jobqueue.lifecycle import JobQueue
    from cherry_train.schemas import JobState, validate_config
    from cherry_train.storage import LocalStorage
    from tests.test_training import finish

    seams = Seams(compiler=FakeCompiler(pack=lambda key: pytest.fail("packed"),
                                        unpack=lambda data, key: pytest.fail("loaded")))
    queue = JobQueue(LocalStorage(root_with_data))
    jobs = [queue.submit(validate_config(tiny_config)).job_id for _ in range(2)]
    planted = root_with_data / JobPaths(jobs[0]).compiled_kernels
    planted.parent.mkdir(parents=True)
    planted.write_bytes(KernelSeal(KEY).sign(b"a key holder's kernels", jobs[0]))
    with structlog.testing.capture_logs() as events:
        assert finish(queue, jobs[1], seams=seams).state == JobState.succeeded  # both jobs
    assert queue.storage.exists(JobPaths(jobs[0]).result)
    told = [e for e in events if e["event"].startswith("compiled kernels are not stored")]
    assert len(told) == 1, told  # once per worker, not per job
    assert "no kernel key" in told[0]["event"] and "CHERRY_KERNEL_KEY" in told[0]["event"]
    assert [e["earlier_kernels"] for e in events if e["event"] == "compiling the model"] == \
        ["off (no kernel key)"] * 2


def compilation(root, tiny_config, stored, loaded: list):
    """One claimed job's Compilation, by a worker holding KEY, with stored(job_id) as the job's
    compiled-kernels file; the loader (torch's load_cache_artifacts) records what reaches it."""
    from torch import nn

    from cherry_train.jobqueue.claims import WorkerIdentity
    from cherry_train.jobqueue.lifecycle import JobQueue
    from cherry_train.schemas import validate_config
    from cherry_train.storage import LocalStorage

    queue = JobQueue(LocalStorage(root))
    claim = queue.try_claim(queue.submit(validate_config(tiny_config)), WorkerIdentity("w"))
    queue.storage.write_atomic(claim.paths.compiled_kernels, stored(claim.job_id))
    compiler = FakeCompiler(pack=lambda key: None,
                            unpack=lambda data, key: loaded.append(data))
    return compiling.Compilation(compiler, nn.Linear(2, 2), CUDA, "on", False,
                                 queue.owner(claim), KernelSeal(KEY), report=lambda **_: None)


BLOB = b"cherry-train compiled kernels\n{}\nartifacts"


def test_kernels_a_key_holder_stored_for_the_job_are_loaded(tmp_path, tiny_config):
    import structlog

    loaded = []
    c = compilation(tmp_path, tiny_config, lambda job_id: KernelSeal(KEY).sign(BLOB, job_id),
                    loaded)
    with structlog.testing.capture_logs() as events:
        c.consider(micro=16, steps_left=1000)
    assert loaded == [BLOB] and c.state == compiling.CompileState.first_step
    (asked,) = [e for e in events if e["event"] == "compiling the model"]
    assert asked["earlier_kernels"].startswith("loaded (0.0 MB, MAC checked in ")
    assert (tmp_path / c.kernels_path).exists()


@pytest.mark.parametrize("stored", [
    pytest.param(lambda job_id: KernelSeal(KEY).sign(BLOB, job_id)[:-1] + b"X",
                 id="one byte changed"),
    pytest.param(lambda job_id: KernelSeal(b"somebody else's key of 32 chars.").sign(BLOB, job_id),
                 id="another key"),
    pytest.param(lambda job_id: BLOB, id="no MAC"),
    pytest.param(lambda job_id: KernelSeal(KEY).sign(BLOB, job_id + "-another"),
                 id="another job's"),
])
def test_stored_kernels_that_do_not_verify_never_reach_the_loader(tmp_path, tiny_config,
                                                                  stored):
    import structlog

    loaded = []
    c = compilation(tmp_path, tiny_config, stored, loaded)
    path = tmp_path / c.kernels_path
    assert path.exists()
    with structlog.testing.capture_logs() as events:
        c.consider(micro=16, steps_left=1000)
    assert loaded == []  # never deserialised
    assert c.state == compiling.CompileState.first_step  # compiles as without them
    (warning,) = [e for e in events if e["log_level"] == "warning"]
    assert warning["file"] == c.kernels_path and warning["deleted"] is True
    assert "refused" in warning["event"]
    assert not path.exists()  # this attempt owns the job's files: the refused file goes
    (asked,) = [e for e in events if e["event"] == "compiling the model"]
    assert asked["earlier_kernels"].startswith("refused: ")


def test_an_out_of_memory_back_off_recompiles_and_stores_kernels_a_resumed_attempt_can_use(
        root_with_data, tiny_config, monkeypatch):
    """Out of memory on a compiled job: the smaller micro-batch is compiled afresh, and its
    kernels, not the refused batch's, are stored under the key the resumed attempt asks for."""
    from cherry_train.jobqueue.layout import JobPaths
    from cherry_train.jobqueue.lifecycle import JobQueue
    from cherry_train.schemas import JobState, validate_config
    from cherry_train.storage import LocalStorage
    from tests.test_training import finish, fit_only

    compiled_for, packed, loaded = [], [], []

    def compile_model(model, micro):
        compiled_for.append(micro)
        return model, "default"

    compiler = FakeCompiler(
        key=lambda mode, micro, device: {"micro": micro}, compile=compile_model,
        pack=lambda key: packed.append(key) or repr(key).encode(),
        unpack=lambda data, key: loaded.append(key) if data == repr(key).encode()
        else "another set-up")
    # Compiled: out of memory above 4 images.
    seams = replace(fit_only(4, when=lambda: bool(compiled_for)), compiler=compiler)
    queue = JobQueue(LocalStorage(root_with_data))
    job_id = queue.submit(validate_config(tiny_config)).job_id
    assert finish(queue, job_id, stop_at_step=3, seams=seams, kernel_seal=KernelSeal(KEY)) is None
    assert compiled_for == [16, 8, 4]
    assert packed == [{"micro": 4}]
    stored = root_with_data / JobPaths(job_id).compiled_kernels
    assert KernelSeal(KEY).verify(stored.read_bytes(), job_id) == repr({"micro": 4}).encode()
    result = finish(queue, job_id, seams=seams, kernel_seal=KernelSeal(KEY))
    assert result.state == JobState.succeeded and result.micro_batch == 4
    assert compiled_for[3:] == [4] and loaded == [{"micro": 4}]  # the resumed attempt used them
