"""The GPU input pipeline's logic, run on the CPU: same draws as the worker path, nearly the
same pixels, the same batches in the same order (the `gpu` tests compare loss curves on CUDA)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cherry_train.worker.inputs.gpudata import GpuBatches, decode_all, stored_side
from cherry_train.worker.inputs.samples import EpochSampler, ImageFolderSamples, Transform


@pytest.fixture
def samples(cherry_images):
    classes = sorted(p.name for p in (cherry_images / "train").iterdir())
    return ImageFolderSamples(cherry_images / "train", classes,
                              Transform(32, augment=True, min_scale=0.5), seed=3)


def batches(samples, augment, normalize=False, batch=8):
    side = stored_side(32, 0.5)
    decoded = decode_all(samples, side, torch.device("cpu"), num_workers=0)
    sampler = EpochSampler(len(samples), samples.seed, shuffle=True)
    return GpuBatches(decoded, sampler, batch, 32, augment, 0.5, samples.seed, normalize,
                      drop_last=True)


def test_the_stored_copy_is_big_enough_for_the_smallest_crop():
    assert stored_side(224, 0.5) == 317  # 224 / sqrt(0.5)
    assert stored_side(224, 0.08) == 448  # capped at 2x
    assert stored_side(224, 1.0) == 299  # at least 4/3 (centre crops of 4:3 images)


@pytest.mark.parametrize("augment", [True, False])
def test_same_crops_and_flips_as_the_worker_path_nearly_the_same_pixels(samples, augment):
    gpu = batches(samples, augment)
    gpu.sampler.set_position(epoch=1, start=0)
    x, y = next(iter(gpu))
    order = gpu.sampler.order()[:8].tolist()
    cpu_transform = Transform(32, augment=augment, min_scale=0.5)
    for k, index in enumerate(order):
        path, label = samples.samples[index]
        from PIL import Image

        with Image.open(path) as f:
            img = f.convert("RGB")
        rng = np.random.default_rng((samples.seed, 1, index))
        expected = cpu_transform(img, rng).float() / 255
        assert y[k].item() == label
        diff = (x[k] - expected).abs().mean().item()
        assert diff < 0.03, f"sample {index}: mean abs difference {diff:.3f}"


def test_batches_follow_the_sampler_and_resume_mid_epoch(samples):
    gpu = batches(samples, augment=True)
    gpu.sampler.set_position(epoch=2, start=0)
    whole = [(x.clone(), y.clone()) for x, y in gpu]
    assert len(whole) == len(samples) // 8
    gpu.sampler.set_position(epoch=2, start=3 * 8)
    rest = list(gpu)
    assert len(rest) == len(whole) - 3
    for (xa, ya), (xb, yb) in zip(whole[3:], rest, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_normalisation_matches_the_worker_path(samples):
    from cherry_train.worker.inputs.samples import to_model_input

    plain = batches(samples, augment=False, normalize=False)
    normed = batches(samples, augment=False, normalize=True)
    plain.sampler.set_position(0, 0)
    normed.sampler.set_position(0, 0)
    (x, _), (xn, _) = next(iter(plain)), next(iter(normed))
    expected = to_model_input((x * 255).round().to(torch.uint8), torch.device("cpu"), True)
    assert torch.allclose(xn, expected, atol=0.02)


def streamed(samples, augment, batch=8, normalize=False):
    from cherry_train.worker.inputs.gpustream import StreamedBatches

    sampler = EpochSampler(len(samples), samples.seed, shuffle=True)
    return StreamedBatches(samples, sampler, batch, 32, augment, 0.5, normalize,
                           drop_last=True, device=torch.device("cpu"))


@pytest.mark.parametrize("augment", [True, False])
def test_streamed_batches_crop_what_the_worker_path_crops(samples, augment):
    from PIL import Image

    stream = streamed(samples, augment)
    stream.sampler.set_position(epoch=1, start=0)
    x, y = next(iter(stream))
    cpu_transform = Transform(32, augment=augment, min_scale=0.5)
    for k, index in enumerate(stream.sampler.order()[:8].tolist()):
        path, label = samples.samples[index]
        with Image.open(path) as f:
            img = f.convert("RGB")
        expected = cpu_transform(img, np.random.default_rng((samples.seed, 1, index))).float()
        assert y[k].item() == label
        diff = (x[k] - expected / 255).abs().mean().item()
        assert diff < 0.03, f"sample {index}: mean abs difference {diff:.3f}"


def test_streamed_batches_resume_mid_epoch_exactly(samples):
    stream = streamed(samples, augment=True)
    stream.sampler.set_position(epoch=2, start=0)
    whole = list(stream)
    stream.sampler.set_position(epoch=2, start=3 * 8)
    rest = list(stream)
    assert len(rest) == len(whole) - 3
    for (xa, ya), (xb, yb) in zip(whole[3:], rest, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_streamed_batches_take_pngs_and_mixed_sizes(tmp_path, cherry_images):
    from PIL import Image

    from cherry_train.worker.inputs.samples import ImageFolderSamples

    root = tmp_path / "mixed"
    for i, path in enumerate(sorted((cherry_images / "train" / "good").iterdir())[:6]):
        (root / "good").mkdir(parents=True, exist_ok=True)
        with Image.open(path) as f:
            img = f.convert("RGB").resize((40 + 8 * i, 36))
        img.save(root / "good" / (f"{i}.png" if i % 2 else f"{i}.jpg"))
    ds = ImageFolderSamples(root, ["good"], Transform(32, augment=True), seed=1)
    x, y = next(iter(streamed(ds, augment=True, batch=6)))
    assert x.shape == (6, 3, 32, 32) and torch.isfinite(x).all() and x.max() <= 1


def test_jpeg_size_reads_the_frame_header(cherry_images):
    from PIL import Image

    from cherry_train.worker.inputs.gpustream import jpeg_size

    for path in sorted((cherry_images / "train" / "good").iterdir())[:5]:
        with Image.open(path) as f:
            assert jpeg_size(path.read_bytes()) == f.size
    assert jpeg_size(b"\x89PNG\r\n\x1a\n....") is None
    assert jpeg_size(b"\xff\xd8\xff") is None  # cut short
