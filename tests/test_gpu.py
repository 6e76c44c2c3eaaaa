"""CUDA paths: mixed precision (bf16 and fp16 + GradScaler), channels_last, loader workers with
pinned memory. Run on a GPU machine with `pytest -m gpu`."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from cherry_train.jobqueue.claims import WorkerIdentity
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.schemas import JobState, Result, validate_config
from cherry_train.storage import LocalStorage
from cherry_train.worker.loop import Worker, WorkerOptions

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def run_on_gpu(root, cfg, monkeypatch) -> Result:
    monkeypatch.setenv("CHERRY_DEVICE", "cuda")
    queue = JobQueue(LocalStorage(root))
    job_id = queue.submit(validate_config(cfg)).job_id
    Worker(queue, WorkerIdentity("gpu"), WorkerOptions(exit_when_idle=True)).run()
    return Result.from_json((root / "done" / job_id / "result.json").read_bytes())


def epoch_losses(root, result):
    lines = (root / "done" / result.job_id / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["train_loss"] for x in lines if json.loads(x)["kind"] == "epoch"]


@pytest.mark.parametrize(("amp", "expected"), [
    ("auto", "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp16"),
    ("fp16", "fp16"),
    ("off", "off"),
])
def test_mixed_precision_trains_on_the_gpu(root_with_data, tiny_config, monkeypatch, amp,
                                           expected):
    tiny_config.update(amp=amp)
    tiny_config["training"]["epochs"] = 4
    tiny_config["training"]["learning_rate"] = 0.001
    tiny_config["data"]["num_workers"] = None  # the GPU default: loader processes, pinned memory
    result = run_on_gpu(root_with_data, tiny_config, monkeypatch)
    assert result.state == JobState.succeeded, result.error
    assert result.amp == expected
    assert result.device == torch.cuda.get_device_name()
    losses = epoch_losses(root_with_data, result)
    assert losses[-1] < losses[0], losses


def test_precisions_compute_the_same_thing(tmp_path, cherry_images, tiny_config, monkeypatch):
    """bf16/fp16 runs follow the fp32 run's loss curve within mixed-precision tolerance."""
    # A small learning rate: with 6 steps an epoch, Adam at 5e-4 makes runs of one setup
    # differ by more than the precisions do (measured on an H100).
    tiny_config["training"]["epochs"] = 3
    tiny_config["training"]["learning_rate"] = 0.0001
    tiny_config["augmentation"]["enabled"] = False
    # Repeatable kernels: with cuDNN's autotuner, fp16's first steps overflowed (and were
    # skipped by the GradScaler) a varying number of times, and its curve came out bimodal
    # (epoch 2 at 0.40 or 0.57 against fp32's 0.40, in old and new code alike).
    tiny_config["deterministic"] = True
    # The precisions alone (the fast paths are compared with the plain one below).
    tiny_config["performance"] = {"input_pipeline": "workers", "fused_optimizer": False}
    curves = {}
    for amp in ("off", "bf16", "fp16"):
        root = tmp_path / amp
        root.mkdir()
        (root / "data").symlink_to(cherry_images, target_is_directory=True)
        tiny_config["amp"] = amp
        result = run_on_gpu(root, tiny_config, monkeypatch)
        assert result.state == JobState.succeeded, result.error
        curves[amp] = epoch_losses(root, result)
    # fp16's GradScaler skips the first steps while it finds its scale: with 6 steps an
    # epoch that puts it a little behind, hence its wider band.
    for amp, share in (("bf16", 0.1), ("fp16", 0.3)):
        for ref, got in zip(curves["off"], curves[amp], strict=True):
            assert abs(got - ref) <= share * abs(ref) + 0.05, (amp, curves)


def test_a_real_cuda_out_of_memory_backs_off(tmp_path, tiny_config, monkeypatch):
    """ResNet-50 at 224 px with batch 4096 needs hundreds of GB of activations: the step must
    end up in micro-batches that fit, still one optimizer step over all 4096 images."""
    from cherry_train.demo.cherries import generate_dataset

    root = tmp_path / "root"
    generate_dataset(root / "data", train=4096, val=64, size=32, seed=2)
    tiny_config.update(amp="auto", mode="development")
    tiny_config["model"]["name"] = "resnet50"
    tiny_config["training"].update(epochs=1, batch_size=4096)
    tiny_config["data"].update(image_size=224, num_workers=None)
    result = run_on_gpu(root, tiny_config, monkeypatch)
    assert result.state == JobState.succeeded, result.error
    assert result.steps_completed == 1
    assert result.oom_backoffs and result.micro_batch < 4096
    torch.cuda.empty_cache()


def curves_of(tmp_path, cherry_images, tiny_config, monkeypatch, runs: dict[str, dict]):
    """Run the tiny job once per variant of `performance`; its per-epoch train losses."""
    curves = {}
    for name, performance in runs.items():
        root = tmp_path / name
        root.mkdir()
        (root / "data").symlink_to(cherry_images, target_is_directory=True)
        result = run_on_gpu(root, {**tiny_config, "performance": performance}, monkeypatch)
        assert result.state == JobState.succeeded, result.error
        curves[name] = epoch_losses(root, result)
    return curves


def close(ref: list[float], got: list[float], share: float) -> bool:
    return all(abs(g - r) <= share * abs(r) + 0.05 for r, g in zip(ref, got, strict=True))


@pytest.mark.parametrize("augment", [True, False])
def test_the_gpu_input_pipelines_compute_the_same_thing(tmp_path, cherry_images, tiny_config,
                                                        monkeypatch, augment):
    """Decoded once (gpu) or per batch by nvJPEG (stream), cropped and flipped on the GPU: the
    same draws and order as the loader workers, resampled slightly differently; the loss
    curves agree."""
    tiny_config["training"].update(epochs=4, learning_rate=0.0001)
    tiny_config["augmentation"]["enabled"] = augment
    tiny_config["data"]["num_workers"] = None
    curves = curves_of(tmp_path, cherry_images, tiny_config, monkeypatch, {
        "workers": {"input_pipeline": "workers", "compile": "off"},
        "gpu": {"input_pipeline": "gpu", "compile": "off"},
        "stream": {"input_pipeline": "stream", "compile": "off"},
        "split": {"input_pipeline": "split", "resident_share": 0.5, "compile": "off"}})
    print("pipeline curves", curves)
    for pipeline in ("gpu", "stream", "split"):
        assert close(curves["workers"], curves[pipeline], 0.15), curves
        assert curves[pipeline][-1] < curves[pipeline][0], curves


@pytest.mark.parametrize("augment", [True, False])
def test_streamed_crops_on_cuda_are_the_loader_paths(cherry_images, augment):
    import numpy as np
    from PIL import Image

    from cherry_train.worker.inputs.gpustream import StreamedBatches
    from cherry_train.worker.inputs.samples import EpochSampler, ImageFolderSamples, Transform

    classes = sorted(p.name for p in (cherry_images / "train").iterdir())
    samples = ImageFolderSamples(cherry_images / "train", classes,
                                 Transform(32, augment=augment, min_scale=0.5), seed=3)
    stream = StreamedBatches(samples, EpochSampler(len(samples), 3, shuffle=True), 16, 32,
                             augment, 0.5, False, drop_last=True, device=torch.device("cuda"),
                             num_workers=2)
    stream.sampler.set_position(epoch=1, start=0)
    batches = list(stream)  # through the prefetching thread and its stream
    assert len(batches) == len(samples) // 16
    x, y = batches[0]
    assert x.is_cuda and x.is_contiguous(memory_format=torch.channels_last)
    for k, index in enumerate(stream.sampler.order()[:16].tolist()):
        path, label = samples.samples[index]
        with Image.open(path) as f:
            img = f.convert("RGB")
        expected = Transform(32, augment, 0.5)(img, np.random.default_rng((3, 1, index)))
        assert y[k].item() == label
        diff = (x[k].cpu() - expected.float() / 255).abs().mean().item()
        assert diff < 0.03, f"sample {index}: mean abs difference {diff:.3f}"
    stream.sampler.set_position(epoch=1, start=2 * 16)  # a resume: the same batches on
    for (xa, ya), (xb, yb) in zip(batches[2:], stream, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    from cherry_train.worker.inputs.loaders import shut_down

    shut_down(stream.loader)


def test_a_split_on_cuda_serves_the_resident_and_the_streamed_pipelines_pixels(cherry_images):
    """Half the set decoded in GPU memory, half streamed through nvJPEG on the side stream: each
    sample as the gpu or the stream pipeline gives it (nvJPEG may decode a batch of other
    members a little differently, hence a tolerance), and a resume gives the same batches. A
    growing split (its share decoded while it trains, gpufill.py) serves each sample one way or
    the other, and the split's own batches once its fill is done."""
    import time

    from cherry_train.worker.inputs.data import Data
    from cherry_train.worker.inputs.samples import ImageFolderSamples, Transform

    classes = sorted(p.name for p in (cherry_images / "train").iterdir())

    def data(pipeline, share=None, grow=False):
        train, val = (ImageFolderSamples(cherry_images / s, classes,
                                         Transform(32, augment=s == "train"), seed=3)
                      for s in ("train", "val"))
        return Data(train=train, val=val, classes=classes, batch_size=16, num_workers=2,
                    pin_memory=True, steps_per_epoch=len(train) // 16, val_limit=None,
                    device=torch.device("cuda"), pipeline=pipeline, resident_share=share,
                    grow=grow)

    runs = {name: data(*args) for name, args in
            {"split": ("split", 0.5), "gpu": ("gpu",), "stream": ("stream",),
             "grow": ("split", 0.5, True)}.items()}
    try:
        got = {name: [(x.clone(), y.clone()) for x, y in d.train_batches(1, 0)]
               for name, d in runs.items()}
        order = runs["split"].train_loader(1, 0).sampler.order().tolist()
        resident = len(runs["split"].train) // 2
        for b, ((x, y), (xg, yg), (xs, _)) in enumerate(zip(
                got["split"], got["gpu"], got["stream"], strict=True)):
            assert x.is_cuda and x.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(y, yg)
            for k, index in enumerate(order[b * 16:(b + 1) * 16]):
                want = xg[k] if index < resident else xs[k]
                assert (x[k] - want).abs().max().item() < 0.05, (index, resident)
                grown = got["grow"][b][0][k]
                assert min((grown - want).abs().max().item(),
                           (grown - xs[k]).abs().max().item()) < 0.05, index
        resumed = list(runs["split"].train_batches(1, 2))
        for (xa, ya), (xb, yb) in zip(got["split"][2:], resumed, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        fill = runs["grow"]._gpu["train"].fill
        deadline = time.monotonic() + 60
        while not fill.done:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert bool(fill.ready.all()) and fill.error is None
        for (xa, ya), (xb, yb) in zip(runs["split"].train_batches(2, 0),
                                      runs["grow"].train_batches(2, 0), strict=True):
            assert torch.equal(ya, yb) and (xa - xb).abs().max().item() < 0.05
    finally:
        for d in runs.values():
            d.close()


def test_a_killed_streamed_job_resumes_exactly(tmp_path, cherry_images, tiny_config):
    """deterministic: true with the stream pipeline on CUDA: killed at a step (SIGKILL, real
    worker processes) and resumed, it ends with the uninterrupted run's weights."""
    import os
    import subprocess
    import sys
    import time

    from cherry_train.jobqueue.layout import JobPaths

    tiny_config.update(deterministic=True, lease_seconds=2)
    tiny_config["training"]["epochs"] = 3
    tiny_config["checkpoint"]["every_steps"] = 2
    tiny_config["performance"] = {"input_pipeline": "stream", "compile": "off"}
    results = {}
    for run in ("straight", "killed"):
        root = tmp_path / run
        root.mkdir()
        (root / "data").symlink_to(cherry_images, target_is_directory=True)
        job_id = JobQueue(LocalStorage(root)).submit(validate_config(tiny_config)).job_id
        for fault in (["step@7"] if run == "killed" else []) + [None]:
            env = {**os.environ, "CHERRY_DEVICE": "cuda"}
            env.pop("CHERRY_FAULT", None)
            if fault:
                env["CHERRY_FAULT"] = fault
            subprocess.run([sys.executable, "-m", "cherry_train", "worker", "--root", str(root),
                            "--worker-id", "gpu", "--exit-when-idle", "--poll-seconds", "0.2"],
                           env=env, check=False, timeout=600)
            if fault:
                assert not (root / JobPaths(job_id).result).exists()
                time.sleep(2.5)  # the killed attempt's lease runs out
        results[run] = Result.from_json((root / JobPaths(job_id).result).read_bytes())
    assert results["killed"].attempts == 2, results["killed"]
    assert results["straight"].final_weights_sha256 == results["killed"].final_weights_sha256


def test_auto_streams_a_set_too_large_for_gpu_memory(root_with_data, tiny_config, monkeypatch):
    from structlog.testing import capture_logs

    from cherry_train.worker.inputs import gpudata

    monkeypatch.setattr(gpudata, "GPU_SHARE", 1e-9)  # nothing fits: as 60,000 JPEGs on a T4
    tiny_config["training"]["epochs"] = 1
    tiny_config["amp"] = "fp16"
    with capture_logs() as events:
        result = run_on_gpu(root_with_data, tiny_config, monkeypatch)
    assert result.state == JobState.succeeded, result.error
    (chosen,) = [e for e in events if e["event"] == "input pipeline"]
    assert chosen["pipeline"] == "stream" and "would not fit" in chosen["why"], chosen


def test_compiled_and_fused_steps_compute_the_same_thing(tmp_path, cherry_images, tiny_config,
                                                         monkeypatch):
    tiny_config["training"].update(epochs=3, learning_rate=0.0001)
    tiny_config["augmentation"]["enabled"] = False
    curves = curves_of(tmp_path, cherry_images, tiny_config, monkeypatch, {
        "plain": {"input_pipeline": "gpu", "compile": "off", "fused_optimizer": False},
        "fast": {"input_pipeline": "gpu", "compile": "on", "fused_optimizer": True}})
    assert close(curves["plain"], curves["fast"], 0.1), curves


def test_auto_picks_the_gpu_pipeline_and_skips_compiling_a_short_job(root_with_data,
                                                                     tiny_config, monkeypatch):
    from structlog.testing import capture_logs

    tiny_config["training"]["epochs"] = 2
    tiny_config["data"]["num_workers"] = None
    with capture_logs() as events:
        result = run_on_gpu(root_with_data, tiny_config, monkeypatch)
    assert result.state == JobState.succeeded, result.error
    chosen = [e for e in events if e["event"] == "input pipeline"]
    assert chosen and chosen[0]["pipeline"] == "gpu"
    assert any(e["event"] == "not compiling the model" for e in events)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_fused_and_foreach_optimizers_take_the_same_fp16_scaled_step(optimizer):
    from cherry_train.worker.training.optim import make_optimizer

    cfgs = {fused: validate_config({
        "model": {"name": "resnet18", "num_classes": 2},
        "training": {"epochs": 1, "batch_size": 4, "learning_rate": 0.01,
                     "optimizer": optimizer, "weight_decay": 0.01},
        "data": {"train_path": "t", "val_path": "v"},
        "performance": {"fused_optimizer": fused}}) for fused in (True, False)}
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    x, y = torch.randn(32, 8, device="cuda"), torch.randint(0, 2, (32,), device="cuda")
    params = {}
    for fused, cfg in cfgs.items():
        model = copy.deepcopy(base).cuda()
        opt = make_optimizer(cfg, model, torch.device("cuda"))
        scaler = torch.amp.GradScaler("cuda")
        for _ in range(3):
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        params[fused] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.allclose(params[True], params[False], atol=1e-5, rtol=1e-4)


def test_a_checkpoint_copy_is_the_state_of_its_step_while_training_goes_on():
    # The copy is queued on the stream, not waited for: steps queued before it are in it, steps
    # queued after it are not. The reference is a clone on the GPU queued at the same point.
    from cherry_train.worker.checkpoints.store import StateCopier

    model = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3), torch.nn.Flatten(),
                                torch.nn.Linear(64 * 30 * 30, 512)).cuda()
    model = model.to(memory_format=torch.channels_last)  # as the trainer's models on a GPU
    opt = torch.optim.Adam(model.parameters(), 1e-3, fused=True)
    x = torch.randn(256, 64, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)

    def step():
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()

    copier, buffers = StateCopier(), set()
    for _ in range(2):
        for _ in range(5):
            step()  # queued: the GPU is still busy with these when the copy is asked for
        state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
        copied = copier.copy(state)
        reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
        moments = opt.state_dict()["state"][0]["exp_avg"].clone()
        for _ in range(5):
            step()  # queued behind the copy: must not leak into it
        got = copied.wait()
        for name, value in reference.items():
            assert torch.equal(got["model"][name], value.cpu()), name
        assert torch.equal(got["optimizer"]["state"][0]["exp_avg"], moments.cpu())
        assert not torch.equal(got["model"]["2.weight"], model[2].weight.detach().cpu())
        assert got["model"]["2.weight"].is_pinned()
        # Strides kept: a resumed fused Adam refuses moments in another layout than the weights.
        assert got["model"]["0.weight"].stride() == model[0].weight.stride()
        assert got["optimizer"]["state"][0]["exp_avg"].stride() == model[0].weight.stride()
        buffers.add(got["model"]["2.weight"].data_ptr())
    assert len(buffers) == 1  # the pinned buffers are reused from one checkpoint to the next


def test_a_resumed_attempt_compiles_from_the_kernels_the_first_one_stored(tmp_path,
                                                                          cherry_images,
                                                                          tiny_config):
    # Two real worker processes, each with an empty inductor cache of its own, as on two
    # fresh VMs, holding the same kernel key: the first is killed after its compiled steps and
    # a checkpoint.
    import os
    import subprocess
    import sys
    import time

    from cherry_train.jobqueue.layout import JobPaths

    root = tmp_path / "root"
    root.mkdir()
    (root / "data").symlink_to(cherry_images, target_is_directory=True)
    tiny_config["training"]["epochs"] = 4
    tiny_config["checkpoint"]["every_steps"] = 2
    tiny_config["lease_seconds"] = 2
    tiny_config["performance"] = {"input_pipeline": "gpu", "compile": "on"}
    job_id = JobQueue(LocalStorage(root)).submit(validate_config(tiny_config)).job_id

    def worker(n: int, fault: str | None = None) -> None:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{n}"),
               "CHERRY_DEVICE": "cuda", "CHERRY_KERNEL_KEY": "the workers' key" * 2}
        env.pop("TRITON_CACHE_DIR", None)
        env.pop("CHERRY_FAULT", None)
        if fault:
            env["CHERRY_FAULT"] = fault
        subprocess.run([sys.executable, "-m", "cherry_train", "worker", "--root", str(root),
                        "--worker-id", "gpu", "--exit-when-idle", "--poll-seconds", "0.2"],
                       env=env, check=False, timeout=600)

    worker(1, fault="step@8")
    kernels = root / JobPaths(job_id).compiled_kernels
    assert kernels.stat().st_size > 0
    time.sleep(2.5)  # the killed attempt's lease runs out
    worker(2)
    result = Result.from_json((root / JobPaths(job_id).result).read_bytes())
    assert result.state == JobState.succeeded and result.attempts == 2, result.error
    events = [json.loads(x) for x in (root / JobPaths(job_id).log).read_text().splitlines()]
    asked = {e["attempt"]: e for e in events if e["event"] == "compiling the model"}
    compiled = {e["attempt"]: e for e in events if e["event"] == "model compiled"}
    assert asked[1]["earlier_kernels"] == "none stored" and compiled[1]["cache_hits"] == 0
    assert asked[2]["earlier_kernels"].startswith("loaded"), asked[2]
    assert compiled[2]["cache_hits"] > 0 and compiled[2]["cache_misses"] == 0, compiled[2]
    assert not kernels.exists()  # the finished job keeps none


def test_a_real_cuda_error_hands_the_job_back_and_ends_the_worker(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from cherry_train.worker.loop import EXIT_GPU_FAILED

    script = Path(__file__).with_name("cuda_error_worker.py")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == EXIT_GPU_FAILED, proc.stderr[-3000:]
    assert "Restart session" in proc.stdout + proc.stderr
    (job,) = (tmp_path / "done").iterdir()
    from cherry_train.schemas import Heartbeat

    hb = Heartbeat.from_json((job / "heartbeat.json").read_bytes())
    assert hb.released and ("CUDA error" in hb.error.message or
                            "device-side" in hb.error.message), hb.error
    assert not (job / "result.json").exists()  # handed back, not failed


def test_group_signals_and_a_killed_loader_on_a_gpu_job_never_fail_it(tmp_path, cherry_images):
    """The issue's own case: a job with loader processes, signalled as a whole process group
    (timeout -s TERM, docker stop, a Colab VM's shutdown) while it waits for batches."""
    import os
    import signal

    from test_crash import (
        CRASH_CONFIG,
        loader_processes,
        make_root,
        start_in_own_group,
        wait_for,
    )

    from cherry_train.jobqueue.layout import JobPaths
    from cherry_train.schemas import Heartbeat

    root = make_root(tmp_path, cherry_images, "gpu-signals")
    queue = JobQueue(LocalStorage(root))
    cfg = {**CRASH_CONFIG, "name": "gpu-signals", "deterministic": False,
           "model": {"name": "resnet18", "num_classes": 2},
           "training": {"epochs": 200, "batch_size": 8, "learning_rate": 0.001},
           "data": {**CRASH_CONFIG["data"], "image_size": 64, "num_workers": 4},
           "performance": {"input_pipeline": "workers", "compile": "off"},
           "checkpoint": {"every_steps": 20, "keep_last": 2}}
    job_id = queue.submit(validate_config(cfg)).job_id
    env = {"CHERRY_DEVICE": "cuda", "CHERRY_SLOW": "decode:0.02"}  # input-bound
    for event in ("TERM", "kill-loader", "INT", "TERM"):
        proc = start_in_own_group(root, "gpu", tmp_path / "j.jsonl", env)
        try:
            wait_for(lambda: (hb := queue.heartbeat(job_id)) and hb.attempt ==
                     len(queue.attempts(job_id)) and hb.trained and not hb.released,
                     180, "training on the GPU")
            if event == "kill-loader":
                os.kill(loader_processes(proc.pid)[0], signal.SIGKILL)
                wait_for(lambda: queue.attempts(job_id)[-1].reason == "after-error", 120,
                         "the hand-back")
                wait_for(lambda: (hb := queue.heartbeat(job_id)) and hb.trained and
                         hb.attempt == queue.attempts(job_id)[-1].n, 180, "the next attempt")
                assert queue.heartbeat(job_id).loader_processes == 2  # half of 4
                event = "TERM"
            os.killpg(proc.pid, getattr(signal, f"SIG{event}"))
            assert proc.wait(timeout=120) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        hb = Heartbeat.from_json((root / JobPaths(job_id).heartbeat).read_bytes())
        assert hb.released and hb.error is None, hb.error
        assert not (root / JobPaths(job_id).result).exists()
    died = [a for a in queue.attempts(job_id) if a.previous and a.previous.error]
    assert [a.previous.error.type for a in died] == ["LoaderDied"]


@pytest.mark.parametrize("pipeline", ["gpu", "stream"])
def test_a_timm_model_with_its_own_normalisation_trains_and_exports_on_the_gpu(
        root_with_data, tiny_config, monkeypatch, pipeline):
    """timm's ViT-style normalisation (mean and std 0.5) through a GPU input pipeline, then
    model.onnx exported from the CUDA validation batches and checked, and TensorBoard files."""
    pytest.importorskip("timm")
    pytest.importorskip("onnxruntime")
    tiny_config.update(model={"name": "timm/resnet10t", "num_classes": 2},
                       export={"onnx": True}, tensorboard=True,
                       performance={"input_pipeline": pipeline})
    result = run_on_gpu(root_with_data, tiny_config, monkeypatch)
    assert result.state == JobState.succeeded, result.error
    assert result.export["onnx"]["top1_agreement"] == 1.0, result.export
    assert list((root_with_data / "done" / result.job_id / "tensorboard").iterdir())
