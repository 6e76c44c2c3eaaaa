"""The split GPU input pipeline, run on the CPU: part of the set decoded once, the rest streamed,
each sample's pixels exactly those of the resident-only or the stream-only pipeline; and how
`auto` chooses between them from the free GPU memory (faked through choose_pipeline's seam)."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from structlog.testing import capture_logs

from cherry_train.schemas import validate_config
from cherry_train.worker.inputs.data import Data
from cherry_train.worker.inputs.gpudata import decoded_bytes, stored_side
from cherry_train.worker.inputs.pipelines import choose_pipeline
from cherry_train.worker.inputs.samples import ImageFolderSamples, Transform

BATCH = 8


def sets(cherry_images, augment=True):
    classes = sorted(p.name for p in (cherry_images / "train").iterdir())
    return [ImageFolderSamples(cherry_images / split, classes,
                               Transform(32, augment=augment and split == "train",
                                         min_scale=0.5), seed=3)
            for split in ("train", "val")]


def data(cherry_images, pipeline, share=None, normalize=None, rank=0, ranks=1):
    train, val = sets(cherry_images)
    return Data(train=train, val=val, classes=train.classes, batch_size=BATCH, num_workers=0,
                pin_memory=False, steps_per_epoch=len(train) // BATCH, val_limit=None,
                normalize=normalize, pipeline=pipeline, resident_share=share, rank=rank,
                ranks=ranks)


def epoch(d: Data, n: int, start_step: int = 0):
    return [(x.clone(), y.clone()) for x, y in d.train_batches(n, start_step)]


@pytest.mark.parametrize("share", [0.25, 0.5])
def test_a_split_batch_holds_the_resident_pipelines_and_the_streamed_pipelines_samples(
        cherry_images, share):
    split, gpu, stream = (data(cherry_images, "split", share), data(cherry_images, "gpu"),
                          data(cherry_images, "stream"))
    resident = int(share * len(split.train))  # 96 images: 24 or 48, the first ones
    order = split.train_loader(1, 0).sampler.order().tolist()
    kinds = set()
    for b, ((x, y), (xg, yg), (xs, ys)) in enumerate(zip(
            epoch(split, 1), epoch(gpu, 1), epoch(stream, 1), strict=True)):
        assert torch.equal(y, yg) and torch.equal(y, ys)
        for k, index in enumerate(order[b * BATCH:(b + 1) * BATCH]):
            want = xg[k] if index < resident else xs[k]
            assert torch.equal(x[k], want), (index, resident)
            kinds.add(index < resident)
    assert kinds == {True, False}
    # The two pipelines' pixels differ (resampled from the stored copy or from the file): the
    # comparison above tells which one served each sample.
    assert not torch.equal(epoch(gpu, 1)[0][0], epoch(stream, 1)[0][0])


def test_split_validation_batches_split_the_same_share(cherry_images):
    split, gpu, stream = (data(cherry_images, "split", 0.5, normalize=True),
                          data(cherry_images, "gpu", normalize=True),
                          data(cherry_images, "stream", normalize=True))
    resident = len(split.val) // 2
    at = 0
    for (x, y), (xg, _), (xs, _) in zip(split.val_batches(), gpu.val_batches(),
                                        stream.val_batches(), strict=True):
        for k in range(len(y)):  # validation is in the folder's order
            assert torch.equal(x[k], xg[k] if at + k < resident else xs[k]), at + k
        at += len(y)
    assert at == len(split.val)


def test_a_split_resumes_mid_epoch_exactly(cherry_images):
    split = data(cherry_images, "split", 0.5)
    whole = epoch(split, 2)
    assert len(whole) == len(split.train) // BATCH
    rest = epoch(split, 2, start_step=3)
    assert len(rest) == len(whole) - 3
    for (xa, ya), (xb, yb) in zip(whole[3:], rest, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_two_ranks_of_a_split_serve_the_halves_of_one_ranks_batches(cherry_images):
    whole = epoch(data(cherry_images, "split", 0.5), 1)
    halves = [epoch(data(cherry_images, "split", 0.5, rank=r, ranks=2), 1) for r in (0, 1)]
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *halves, strict=True):
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))


def config(pipeline="auto", **performance):
    return validate_config({
        "model": {"name": "resnet18", "num_classes": 2},
        "training": {"epochs": 1, "batch_size": 8, "learning_rate": 0.01},
        "data": {"train_path": "t", "val_path": "v", "image_size": 32},
        "performance": {"input_pipeline": pipeline, **performance}})


def choose(cherry_images, free: float, cfg=None):
    """choose_pipeline on a CUDA device whose free memory is `free` times the whole decoded
    set's size (GPU_SHARE of it is the budget); the choice and its log line."""
    train, val = sets(cherry_images)
    need = decoded_bytes(len(train) + len(val), stored_side(32, 0.5))
    with capture_logs() as events:
        chosen = choose_pipeline(cfg or config(), torch.device("cuda"), train, val,
                                 free_memory=lambda device: int(free * need))
    said = [e for e in events if e["event"] == "input pipeline"]
    assert len(said) == 1
    return chosen, said[0]


def test_auto_keeps_every_image_resident_when_the_set_fits(cherry_images):
    chosen, said = choose(cherry_images, free=3.01)  # a third of it holds the set
    assert chosen == ("gpu", None)
    assert said["resident_images"] == 128 and said["streamed_images"] == 0


def test_auto_splits_what_does_not_fit_and_says_why(cherry_images):
    # 128 images; a third of the free memory holds 52% of them: 50% resident (steps of 5%).
    chosen, said = choose(cherry_images, free=3 * 0.52)
    assert chosen == ("split", 0.5)
    assert said["pipeline"] == "split"
    assert said["resident_images"] == 48 + 16 and said["streamed_images"] == 64
    need = decoded_bytes(128, stored_side(32, 0.5))
    assert said["gpu_free_megabytes"] == round(int(3 * 0.52 * need) / 2**20)
    assert said["budget_megabytes"] == round(int(3 * 0.52 * need) / 3 / 2**20)
    assert "50% of the decoded images fit in a third of the free GPU memory" in said["why"]


def test_auto_streams_everything_when_almost_nothing_fits(cherry_images):
    chosen, said = choose(cherry_images, free=3 * 0.04)
    assert chosen == ("stream", None)
    assert said["resident_images"] == 0 and said["streamed_images"] == 128
    assert "would not fit in a third of the free GPU memory, nor 1/20 of them" in said["why"]


def test_split_asked_for_is_sized_by_the_memory_or_pinned_by_its_share(cherry_images):
    assert choose(cherry_images, 3 * 0.31, config("split"))[0] == ("split", 0.3)
    assert choose(cherry_images, 3 * 0.04, config("split"))[0] == ("split", 0.0)
    assert choose(cherry_images, 4, config("split"))[0] == ("split", 1.0)
    chosen, said = choose(cherry_images, 4, config("split", resident_share=0.25))
    assert chosen == ("split", 0.25) and said["why"] == "performance.input_pipeline"


def test_resident_share_belongs_to_a_split():
    from cherry_train.schemas.errors import ConfigError

    with pytest.raises(ConfigError, match="performance.resident_share: only with "
                                          "input_pipeline: split"):
        config("auto", resident_share=0.5)
    with pytest.raises(ConfigError, match="performance.resident_share"):
        config("split", resident_share=1.0)  # all of it is input_pipeline: gpu
    assert "resident_share" not in config().model_dump(mode="json")["performance"]


# The resident share decoded while the job trains (gpufill.py). A gate holds the fill thread
# before each chunk of rows, so the tests decide how far it has come.

@pytest.fixture
def gate(monkeypatch):
    from cherry_train.worker.inputs import gpufill

    gate = threading.Semaphore(0)
    decode = gpufill.decode_rows

    def held(*args, **kwargs):
        gate.acquire(timeout=60)
        decode(*args, **kwargs)

    monkeypatch.setattr(gpufill, "decode_rows", held)
    monkeypatch.setattr(gpufill, "CHUNK", 8)
    yield gate
    for _ in range(100):  # a failed test must not leave its thread waiting
        gate.release()


def growing(cherry_images, num_workers=0):
    d = data(cherry_images, "split", 0.5)
    d.grow, d.num_workers = True, num_workers
    return d


def until(condition, seconds=60.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_growing_split_serves_a_resident_sample_from_memory_once_its_row_is_decoded(
        cherry_images, gate):
    grow, gpu, stream = (growing(cherry_images), data(cherry_images, "gpu"),
                         data(cherry_images, "stream"))
    order = grow.train_loader(1, 0).sampler.order().tolist()
    want_gpu, want_stream = epoch(gpu, 1), epoch(stream, 1)

    def served_from_memory_below(ready: int):
        for b, ((x, y), (xg, yg), (xs, _)) in enumerate(zip(epoch(grow, 1), want_gpu,
                                                             want_stream, strict=True)):
            assert torch.equal(y, yg)
            for k, index in enumerate(order[b * BATCH:(b + 1) * BATCH]):
                assert torch.equal(x[k], xg[k] if index < ready else xs[k]), (index, ready)

    try:
        served_from_memory_below(0)  # nothing decoded yet (the fill waits): all streamed
        assert not grow._gpu["train"].fill.done
        fill = grow._gpu["train"].fill
        gate.release()
        until(lambda: bool(fill.ready[:8].all()))
        served_from_memory_below(8)
        with capture_logs() as events:
            for _ in range(5):
                gate.release()
            until(lambda: fill.done)
        assert bool(fill.ready.all()) and fill.error is None
        said = [e for e in events if e["event"] == "images decoded into memory"]
        assert len(said) == 1 and said[0]["in_background"] is True
        assert (said[0]["split"], said[0]["images"], said[0]["streamed"]) == ("train", 48, 48)
        served_from_memory_below(48)  # the split's own batches, as if decoded first
        assert all(torch.equal(x, xs) for (x, _), (xs, _) in zip(
            epoch(grow, 2), epoch(data(cherry_images, "split", 0.5), 2), strict=True))
    finally:
        grow.close()


def test_the_fill_begins_once_the_first_step_is_under_way(cherry_images, gate):
    grow = growing(cherry_images)
    try:
        batches = iter(grow.train_batches(1, 0))
        next(batches)  # the first step's batch: decoding beside it would hold it back
        fill = grow._gpu["train"].fill
        assert not fill.started
        next(batches)
        assert fill.started
    finally:
        for _ in range(6):
            gate.release()
        grow.close()


def test_loader_processes_see_the_rows_the_fill_marks_ready(cherry_images, gate):
    grow, split = growing(cherry_images, num_workers=2), data(cherry_images, "split", 0.5)
    try:
        epoch(grow, 1)  # the loader processes start with nothing ready
        for _ in range(6):
            gate.release()
        until(lambda: grow._gpu["train"].fill.done)
        for (x, y), (xs, ys) in zip(epoch(grow, 2), epoch(split, 2), strict=True):
            assert torch.equal(x, xs) and torch.equal(y, ys)
    finally:
        grow.close()


def test_closing_the_job_ends_the_fill_after_its_chunk(cherry_images, gate):
    grow = growing(cherry_images)
    epoch(grow, 1)  # the fill starts once the first step is under way
    fill = grow._gpu["train"].fill
    gate.release()
    until(lambda: bool(fill.ready[:8].all()))
    threading.Timer(0.5, gate.release).start()  # lets the next chunk go while close() waits
    grow.close()
    assert fill.done and int(fill.ready[16:].sum()) == 0


def test_a_stop_that_outlives_its_wait_says_so(cherry_images, gate, monkeypatch):
    from cherry_train.worker.inputs import gpufill

    monkeypatch.setattr(gpufill, "STOP_SECONDS", 0.2)
    grow = growing(cherry_images)
    epoch(grow, 1)  # the fill has started, and waits at the gate with its first chunk
    with capture_logs() as events:
        grow.close()
    assert [e["event"] for e in events if e["log_level"] == "warning"] == [
        "resident share: the decoding thread did not end in time"]
    gate.release()  # its chunk, then it sees the stop
    until(lambda: grow._gpu["train"].fill.done)
    assert int(grow._gpu["train"].fill.ready[8:].sum()) == 0


def test_a_resident_image_that_does_not_decode_fails_the_job_naming_it(cherry_images,
                                                                        tmp_path, gate):
    from cherry_train.worker.errors import JobError

    shutil.copytree(cherry_images, tmp_path / "data")
    grow = growing(tmp_path / "data")
    drawn = grow.train_loader(1, 0).sampler.order().tolist()[:3 * BATCH]
    index = min(set(range(8)) - set(drawn))  # in the fill's first chunk, not in 3 batches
    broken = grow.train.samples[index][0]
    Path(broken).write_bytes(b"\xff\xd8 not a jpeg")
    try:
        batches = iter(grow.train_batches(1, 0))
        next(batches)
        next(batches)  # the fill has started
        for _ in range(6):
            gate.release()
        until(lambda: grow._gpu["train"].fill.done)
        # The third batch says so: the fill met it, whichever batch draws it.
        with pytest.raises(JobError, match=f"data: {broken} does not decode as an image"):
            next(batches)
    finally:
        grow.close()


def test_a_fill_out_of_gpu_memory_leaves_the_rest_streamed_and_says_so(cherry_images,
                                                                       monkeypatch):
    from cherry_train.worker.inputs import gpufill

    decode, calls = gpufill.decode_rows, []

    def short_of_memory(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 412 MiB")
        decode(*args, **kwargs)

    monkeypatch.setattr(gpufill, "decode_rows", short_of_memory)
    monkeypatch.setattr(gpufill, "CHUNK", 8)
    grow, split = growing(cherry_images), data(cherry_images, "split", 0.5)
    stream = data(cherry_images, "stream")
    try:
        with capture_logs() as events:
            epoch(grow, 1)
            until(lambda: grow._gpu["train"].fill.done)
        fill = grow._gpu["train"].fill
        assert fill.error is None and int(fill.ready.sum()) == 8
        said = [e for e in events if e["event"].startswith("resident share: decoding stopped")]
        assert said and said[0]["decoded"] == 8 and said[0]["streamed"] == 40
        order = grow.train_loader(2, 0).sampler.order().tolist()
        for b, ((x, _), (xg, _), (xs, _)) in enumerate(zip(epoch(grow, 2), epoch(split, 2),
                                                            epoch(stream, 2), strict=True)):
            for k, index in enumerate(order[b * BATCH:(b + 1) * BATCH]):
                assert torch.equal(x[k], xg[k] if index < 8 else xs[k]), index
    finally:
        grow.close()


@pytest.mark.parametrize(("extra", "grows"), [
    ({}, True), ({"deterministic": True}, False),
    ({"performance": {"input_pipeline": "split", "resident_share": 0.5}}, False)])
def test_only_a_job_whose_pixels_may_depend_on_timing_grows_its_share(cherry_images, extra,
                                                                       grows):
    from cherry_train.worker.inputs.data import load_data

    cfg = validate_config({
        "model": {"name": "resnet18", "num_classes": 2},
        "training": {"epochs": 1, "batch_size": 8, "learning_rate": 0.01},
        "data": {"train_path": "t", "val_path": "v", "image_size": 32, "num_workers": 0},
        **extra})
    d = load_data(cfg, cherry_images / "train", cherry_images / "val", torch.device("cpu"))
    assert d.grow is grows


def test_nvjpeg_out_of_memory_is_raised_for_the_fill_and_left_to_pil_at_set_up(
        cherry_images, monkeypatch):
    """torchvision reports nvJPEG's failed allocation as a RuntimeError, as it does a file it
    cannot take: the fill must see it as what it is (gpufill leaves the rest streamed), where
    falling back to PIL in the training process would slow every step on 2 cores unsaid."""
    import numpy as np
    import torchvision.io

    from cherry_train.worker.inputs import gpudata

    def short_of_memory(*args, **kwargs):
        raise RuntimeError("Error while decoding JPEG images: CUDA out of memory")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", short_of_memory)
    train, _ = sets(cherry_images)
    images, sizes = torch.zeros((4, 3, 8, 8), dtype=torch.uint8), np.zeros((4, 2), np.int64)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="out of memory"):
        gpudata._decode_jpegs_on_gpu(train, [0, 1, 2, 3], 8, images, sizes, 2, raise_oom=True)
    assert gpudata._decode_jpegs_on_gpu(train, [0, 1, 2, 3], 8, images, sizes, 2,
                                        raise_oom=False) == [0, 1, 2, 3]


def test_the_nvjpeg_decode_resizes_in_groups_into_each_images_own_row(cherry_images,
                                                                       monkeypatch):
    """Its resize, one call per group of images of one size, gives each row what one call per
    image gave it (torchvision's CPU decoder stands in for nvJPEG here)."""
    import numpy as np
    import torchvision.io

    from cherry_train.worker.inputs import gpudata

    cpu_decode = torchvision.io.decode_jpeg
    monkeypatch.setattr(torchvision.io, "decode_jpeg", lambda data, mode, device: [
        cpu_decode(d, mode=mode) for d in data])
    monkeypatch.setattr(gpudata, "RESIZE_GROUP", 3)
    train, _ = sets(cherry_images)
    indices = [5, 0, 9, 2, 7, 1, 3]  # 2 nvJPEG batches of 5 and 2; groups of 3, 2 and 2
    images = torch.zeros((10, 3, 24, 24), dtype=torch.uint8)
    sizes = np.zeros((10, 2), np.int64)
    assert gpudata._decode_jpegs_on_gpu(train, indices, 24, images, sizes, 5, False) == []
    for i in range(10):
        if i not in indices:
            assert not images[i].any() and not sizes[i].any()
            continue
        img = cpu_decode(torch.frombuffer(bytearray(train.read(i)), dtype=torch.uint8),
                         mode=torchvision.io.ImageReadMode.RGB)
        one = torch.nn.functional.interpolate(img[None].float(), size=(24, 24),
                                              mode="bilinear", antialias=True,
                                              align_corners=False)
        assert torch.equal(images[i], one.round().clamp(0, 255).to(torch.uint8)[0]), i
        assert tuple(sizes[i]) == (img.shape[2], img.shape[1])
