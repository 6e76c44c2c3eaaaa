"""The GPU input pipeline: decode once, augment whole batches on the GPU.

JPEG decoding and resizing on the CPU caps training far below what a GPU can do (under 2,000
images/s on 16 cores for ResNet-50; a Colab VM has fewer). So, when the data set fits:

1. Every image is decoded once (DataLoader worker processes, PIL's JPEG draft mode), resized
   to side x side (aspect ratio not kept: the crop boxes below undo it) and stored as uint8 in
   one tensor in GPU memory, with its original width and height.
2. Each batch is gathered from that tensor, and the random-resized crop + horizontal flip of
   every sample are applied in one `torchvision.ops.roi_align` call: each crop box is the same
   box the CPU path would cut from the original image, drawn from the same per-sample generator
   (seed, epoch, index) in the same order, mapped into the stored image's coordinates.

So data order and augmentation draws are those of the worker path (resume stays exact within
this path); pixels differ only by resampling (a box resampled from a 1.4x stored copy instead of
from the original), which the `gpu` tests bound by comparing loss curves.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import structlog
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import roi_align
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from cherry_train.sizes import stored_side  # noqa: F401 (below: the data pack needs it too)
from cherry_train.worker.inputs.loaders import loader_processes
from cherry_train.worker.inputs.samples import (
    EpochSampler,
    ImageFolderSamples,
    Normalize,
    as_normalize,
    crop_box,
    undecodable,
)

log = structlog.get_logger(__name__)

#: Share of free GPU memory the decoded images may take (the model and activations need the
#: rest; ResNet-50 at batch 256 in bf16 takes about 25 GB).
GPU_SHARE = 1 / 3


def decoded_bytes(n_images: int, side: int) -> int:
    return n_images * 3 * side * side


class _Decode(Dataset):
    """Item i: image i of the folder, decoded and resized to side x side (uint8 CHW)."""

    def __init__(self, samples: ImageFolderSamples, side: int):
        self.samples, self.side = samples, side

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, _ = self.samples.samples[index]
        try:
            with self.samples.open(index) as f:
                size = f.size
                f.draft("RGB", (self.side, self.side))  # JPEG: decode at a reduced scale
                img = f.convert("RGB")
        except (OSError, SyntaxError, ValueError) as e:
            raise undecodable(path, e) from None
        img = F.resize(img, [self.side, self.side], InterpolationMode.BILINEAR, antialias=True)
        return F.pil_to_tensor(img), torch.tensor(size)


@dataclass
class DecodedImages:
    images: torch.Tensor  # N x 3 x side x side, uint8, on the device
    sizes: np.ndarray | torch.Tensor  # N x 2: original (width, height); shared by gpufill
    labels: torch.Tensor  # N, int64, on the device
    seconds: float

    @property
    def side(self) -> int:
        return self.images.shape[-1]


def say_decoded(split: str, decoded: DecodedImages, streamed: int, **extra) -> None:
    """The one log line for a decoded cache, decoded first (data.py) or while training
    (gpufill.py)."""
    log.info("images decoded into memory", split=split, images=len(decoded.sizes),
             streamed=streamed, side=decoded.side, megabytes=round(decoded.images.numel() / 2**20),
             seconds=round(decoded.seconds, 1), device=str(decoded.images.device), **extra)


def decode_all(samples: ImageFolderSamples, side: int, device: torch.device,
               num_workers: int, count: int | None = None) -> DecodedImages:
    """The first `count` images (all by default; a split keeps the rest streamed, gpusplit.py):
    on CUDA, JPEGs are decoded in batches by nvJPEG on the GPU and resized there; other files
    (and JPEGs nvJPEG refuses) by PIL in loader processes."""
    started = time.perf_counter()
    n = len(samples) if count is None else count
    images = torch.empty((n, 3, side, side), dtype=torch.uint8, device=device)
    sizes = np.zeros((n, 2), dtype=np.int64)
    decode_rows(samples, range(n), side, images, sizes, num_workers)
    labels = torch.tensor([label for _, label in samples.samples[:n]], device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return DecodedImages(images, sizes, labels, time.perf_counter() - started)


NVJPEG_BATCH = 256
#: Images resized in one call: the float copies of 32 images of 448 px take 77 MB, where a whole
#: batch's would take 1.6 GB, beside a job already training when gpufill.py decodes.
RESIZE_GROUP = 32


def decode_rows(samples: ImageFolderSamples, indices: Sequence[int], side: int,
                images: torch.Tensor, sizes: np.ndarray, num_workers: int,
                batch: int = NVJPEG_BATCH, raise_oom: bool = False) -> None:
    """Rows `indices` of the cache (the folder's images of those indices) and their original
    sizes: on CUDA, JPEGs by nvJPEG `batch` at a time, on the current stream; the rest by PIL
    (also a batch nvJPEG fails on, unless it ran out of memory and `raise_oom` says so)."""
    rest = list(indices)
    if images.device.type == "cuda":
        rest = _decode_jpegs_on_gpu(samples, rest, side, images, sizes, batch, raise_oom)
    if rest:
        _decode_with_pil(samples, rest, side, images, sizes, num_workers)


def _decode_with_pil(samples: ImageFolderSamples, indices: list[int], side: int,
                     images: torch.Tensor, sizes: np.ndarray, num_workers: int) -> None:
    subset = torch.utils.data.Subset(_Decode(samples, side), indices)
    loader = DataLoader(subset, batch_size=256, num_workers=num_workers,
                        pin_memory=images.device.type == "cuda", **loader_processes(num_workers),
                        generator=torch.Generator())  # the global RNG stays as resume left it
    at = 0
    for batch, batch_sizes in loader:
        where = torch.as_tensor(indices[at:at + len(batch)], device=images.device)
        images.index_copy_(0, where, batch.to(images.device, non_blocking=True))
        sizes[indices[at:at + len(batch)]] = batch_sizes.numpy()
        at += len(batch)


def _decode_jpegs_on_gpu(samples: ImageFolderSamples, indices: list[int], side: int,
                         images: torch.Tensor, sizes: np.ndarray, batch: int,
                         raise_oom: bool) -> list[int]:
    """Decode the JPEGs among `indices` with nvJPEG (files read by threads); the indices
    left to PIL."""
    from concurrent.futures import ThreadPoolExecutor

    from torchvision.io import ImageReadMode, decode_jpeg

    jpegs = [i for i in indices if samples.is_jpeg(i)]
    left = sorted(set(indices) - set(jpegs))

    def read(i: int) -> torch.Tensor:
        return torch.frombuffer(bytearray(samples.read(i)), dtype=torch.uint8)

    with ThreadPoolExecutor(16) as pool:
        for start in range(0, len(jpegs), batch):
            chunk = jpegs[start:start + batch]
            data = list(pool.map(read, chunk))
            try:
                decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=images.device)
            except RuntimeError as e:  # a file nvJPEG cannot take (CMYK, progressive, broken)
                if raise_oom and "out of memory" in str(e).lower():
                    raise torch.cuda.OutOfMemoryError(str(e)) from e
                left += chunk
                continue
            for i, img in zip(chunk, decoded, strict=True):
                sizes[i] = (img.shape[2], img.shape[1])
            # One resize per image size (a prepared pack's images mostly share one): per image
            # it was 42,000 calls' worth of CPU on a 2-core VM, beside the training loop.
            for members in by_shape(decoded).values():
                for at in range(0, len(members), RESIZE_GROUP):
                    group = members[at:at + RESIZE_GROUP]
                    resized = torch.nn.functional.interpolate(
                        torch.stack([decoded[k] for k in group]).float(), size=(side, side),
                        mode="bilinear", antialias=True, align_corners=False)
                    rows = torch.tensor([chunk[k] for k in group], device=images.device)
                    images.index_copy_(0, rows, resized.round_().clamp_(0, 255).to(torch.uint8))
            # torchvision's decoder writes on a stream of its own, which does not wait for this
            # one: the next batch's outputs must not reuse memory this one's copies still read.
            if images.device.type == "cuda":
                torch.cuda.current_stream(images.device).synchronize()
    return sorted(left)


def by_shape(images: list[torch.Tensor]) -> dict[tuple, list[int]]:
    """The positions of the images of each shape: one batched call per shape."""
    groups: dict[tuple, list[int]] = {}
    for k, img in enumerate(images):
        groups.setdefault(tuple(img.shape), []).append(k)
    return groups


class CropBoxes(Dataset):
    """Item (epoch, index): the sample's crop box in stored coordinates, its flip and its
    index, from its own generator (seed, epoch, index) with data.Transform's draws in their
    order. Loader processes compute these ahead of the training loop: at batch 256 they take
    about 8 ms of CPU a step, which would otherwise compete with launching the model's kernels."""

    def __init__(self, sizes: np.ndarray, side: int, seed: int, augment: bool, min_scale: float):
        self.sizes, self.side, self.seed = sizes, side, seed
        self.augment, self.min_scale = augment, min_scale

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        epoch, index = key
        w, h = (int(v) for v in self.sizes[index])
        x1, y1, x2, y2, flip = crop_box(w, h, self.seed, epoch, index, self.augment,
                                        self.min_scale)
        sx, sy = self.side / w, self.side / h
        return torch.tensor([x1 * sx, y1 * sy, x2 * sx, y2 * sy, float(flip), index],
                            dtype=torch.float64)


class BatchFinish:
    """What every GPU pipeline does last to a batch of crops (float, 0..255): flip the flagged
    ones, scale to 0..1 or ImageNet-normalise, and channels_last on CUDA."""

    def __init__(self, device: torch.device, normalize: bool | Normalize):
        norm = as_normalize(normalize)
        self.normalize, self.device = norm is not None, device
        norm = norm or Normalize()
        self.mean = torch.tensor(norm.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(norm.std, device=device).view(1, 3, 1, 1) * 255

    def __call__(self, x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        flip = flips.to(self.device).view(-1, 1, 1, 1) > 0.5
        x = torch.where(flip, x.flip(-1), x)
        x = (x - self.mean) / self.std if self.normalize else x / 255
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x


class GpuBatches:
    """Batches of one epoch from decoded images: (x, y) ready for the model.

    Iterating yields the batches from the sampler's position on, like a DataLoader."""

    def __init__(self, decoded: DecodedImages, sampler: EpochSampler, batch_size: int,
                 out_size: int, augment: bool, min_scale: float, seed: int, normalize: bool,
                 drop_last: bool, num_workers: int = 0):
        self.decoded, self.sampler, self.batch_size = decoded, sampler, batch_size
        self.out_size, self.normalize, self.drop_last = out_size, normalize, drop_last
        device = decoded.images.device
        self.finish = BatchFinish(device, normalize)
        self.boxes_data = CropBoxes(decoded.sizes, decoded.side, seed, augment, min_scale)
        self.loader = DataLoader(
            self.boxes_data, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
            num_workers=num_workers, pin_memory=device.type == "cuda",
            persistent_workers=num_workers > 0, prefetch_factor=8 if num_workers else None,
            **loader_processes(num_workers),
            # Each iter() draws a base seed: from the global RNG it would shift the stream
            # dropout draws from whenever a resume starts an iterator mid-epoch (data.py too).
            generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for meta in self.loader:
            yield self.batch(meta)

    def boxes(self, epoch: int, indices: list[int]) -> torch.Tensor:
        """The metadata rows of these samples (x1, y1, x2, y2, flip, index)."""
        return torch.stack([self.boxes_data[(epoch, i)] for i in indices])

    def batch(self, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # From pinned memory, so the copy is asynchronous: a copy from pageable memory waits for
        # the GPU to finish all queued work first, which would stall the queue every step.
        meta = meta.to(self.decoded.images.device, non_blocking=True)
        x = crop_decoded(self.decoded.images, meta, self.out_size)
        return self.finish(x, meta[:, 4]), self.decoded.labels.index_select(0, meta[:, 5].long())


def crop_decoded(images: torch.Tensor, meta: torch.Tensor, out_size: int) -> torch.Tensor:
    """The crops (float, 0..255, not yet flipped) that the rows of `meta` (x1, y1, x2, y2 in
    stored coordinates, flip, index; on the images' device) cut from the decoded images."""
    device = images.device
    idx = meta[:, 5].long()
    rois = torch.cat([torch.arange(len(meta), device=device, dtype=meta.dtype)[:, None],
                      meta[:, :4]], dim=1)
    # Half precision on the GPU halves the memory traffic; 0..255 are exact in it.
    dtype = torch.half if device.type == "cuda" else torch.float
    chosen = images.index_select(0, idx).to(dtype)
    return roi_align(chosen, rois.to(dtype), output_size=(out_size, out_size),
                     spatial_scale=1.0, sampling_ratio=-1, aligned=True).float()
