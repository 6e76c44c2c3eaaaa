"""ImageFolder data with augmentation that is a pure function of (seed, epoch, sample index).

Why not torchvision's transforms as they are: they draw from the global RNG, whose state
depends on which DataLoader process handled which batch. Seeding each sample's randomness
from (seed, epoch, index) makes the data of step k the same in an uninterrupted run and in one
resumed at step k, whatever `num_workers` is — which is what exact resume needs.

Samples leave the loader as uint8 tensors (4x less to copy than float); `to_model_input`
converts and normalises them on the training device.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from cherry_train import faults
from cherry_train.safepaths import walk_files
from cherry_train.worker.errors import JobError

JPEG_SUFFIXES = (".jpg", ".jpeg")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Normalize:
    """The per-channel mean and std the model expects its input scaled by (ImageNet's unless the
    model says otherwise: timm's pretrained configs do)."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


def as_normalize(value: bool | Normalize) -> Normalize | None:
    """augmentation.normalize as given: True is ImageNet's, False none."""
    if value is True:
        return Normalize()
    return value or None


def undecodable(path: str, error: Exception) -> JobError:
    """The one message for a data file that is not an image, whichever pipeline met it."""
    return JobError(f"data: {path} does not decode as an image ({error}); remove or replace it")


def crop_params(width: int, height: int, min_scale: float, rng: np.random.Generator):
    """RandomResizedCrop's parameters (area scale in [min_scale, 1], ratio in [3/4, 4/3]),
    drawn from `rng`. Same algorithm as torchvision's, with the centre crop fallback."""
    area = width * height
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target_area = area * rng.uniform(min_scale, 1.0)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    side = min(width, height)
    return (height - side) // 2, (width - side) // 2, side, side


def crop_box(width: int, height: int, seed: int, epoch: int, index: int, augment: bool,
             min_scale: float) -> tuple[float, float, float, float, bool]:
    """The (left, top, right, bottom) box in the original image's pixels that Transform cuts
    for this sample, and its flip: the same draws from the same generator, so the GPU
    pipelines crop what the loader processes would."""
    if augment:
        rng = np.random.default_rng((seed, epoch, index))
        top, left, h, w = crop_params(width, height, min_scale, rng)
        return left, top, left + w, top + h, bool(rng.random() < 0.5)
    s = min(width, height)  # resize the shorter side, centre crop: the centred square
    left, top = (width - s) / 2, (height - s) / 2
    return left, top, left + s, top + s, False


@dataclass(frozen=True)
class Transform:
    size: int
    augment: bool
    min_scale: float = 0.5

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        if self.augment:
            top, left, h, w = crop_params(img.width, img.height, self.min_scale, rng)
            img = F.resized_crop(img, top, left, h, w, [self.size, self.size],
                                 InterpolationMode.BILINEAR, antialias=True)
            if rng.random() < 0.5:
                img = F.hflip(img)
        else:
            img = F.center_crop(F.resize(img, self.size, InterpolationMode.BILINEAR,
                                         antialias=True), self.size)
        return F.pil_to_tensor(img)


def folder_samples(root: Path, classes: list[str],
                   rels: Iterable[str] | None = None) -> list[tuple[str, int]]:
    """(path, class index) of every image below root/<class>/ (`_found`)."""
    return [(path, label) for path, label, _ in _found(root, classes, rels)]


def _found(root: Path, classes: list[str],
           rels: Iterable[str] | None = None) -> list[tuple[str, int, str]]:
    """(path, class index, path below root) of every image below root/<class>/, in
    torchvision's make_dataset order (class, folder, name; the order crop boxes are drawn by),
    but never through a link: read in place (`data.cache: false`) a link would let whoever
    writes the folder have any file this machine can read trained on. The cache's copy has none
    (sources.py skips them). `rels`: the files a prepared pack holds, instead of a listing."""
    index = {c: i for i, c in enumerate(classes)}
    found = []
    for rel in walk_files(root).files if rels is None else rels:
        cls, _, rest = rel.partition("/")
        if rest and cls in index and has_file_allowed_extension(rel, IMG_EXTENSIONS):
            folder, _, name = rel.rpartition("/")
            found.append((cls, folder, name, rel))
    return [(str(root / rel), index[cls], rel) for cls, _, _, rel in sorted(found)]


class Packed(Protocol):
    """Samples' bytes read in place from a prepared pack's local shards (datapack's reader)."""

    def read(self, rel: str) -> bytes: ...


class ImageFolderSamples(Dataset):
    """An ImageFolder whose items are looked up by (epoch, index). Its images are files below
    `root`, or, with `packed`, the samples of a prepared pack read at their offsets in its
    local shards (`rels`: the pack's files, in the original folder's names)."""

    def __init__(self, root: Path, classes: list[str], transform: Transform, seed: int,
                 packed: Packed | None = None, rels: Iterable[str] | None = None):
        self.root = root
        self.classes = classes
        found = _found(root, classes, rels)
        self.samples = [(path, label) for path, label, _ in found]
        self.rels = [rel for _, _, rel in found]
        self.packed = packed
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> bytes:
        """Sample `index`'s encoded bytes."""
        if self.packed is not None:
            return self.packed.read(self.rels[index])
        with open(self.samples[index][0], "rb") as f:
            return f.read()

    def is_jpeg(self, index: int) -> bool:
        """Named as a JPEG (nvJPEG takes it); every sample of a prepared pack is one."""
        return self.packed is not None or self.samples[index][0].lower().endswith(JPEG_SUFFIXES)

    def open(self, index: int) -> Image.Image:
        """Sample `index` as a PIL image, not yet decoded (draft mode may still apply)."""
        if self.packed is not None:
            return Image.open(io.BytesIO(self.read(index)))
        return Image.open(self.samples[index][0])

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        path, label = self.samples[index]
        faults.slow("decode")
        try:
            with self.open(index) as f:
                img = f.convert("RGB")
        except (OSError, SyntaxError, ValueError) as e:  # what PIL raises for broken files
            raise undecodable(path, e) from None
        rng = np.random.default_rng((self.seed, epoch, index))
        return self.transform(img, rng), label


class EpochSampler(Sampler):
    """Yields (epoch, index): a permutation regenerated from (seed, epoch), from `start` on.

    The position is set before each pass (like DistributedSampler.set_epoch), so one loader
    with persistent worker processes serves every epoch and every resume point.

    Over several ranks (`shard=(rank, ranks, batch)`) every rank walks the same order and takes
    its own slice of each global batch of `batch` positions: together the ranks see exactly the
    batches one process would, so positions (and resume points) stay global."""

    def __init__(self, n: int, seed: int, shuffle: bool, stop: int | None = None,
                 shard: tuple[int, int, int] = (0, 1, 1)):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.stop = n if stop is None else min(stop, n)
        self.epoch, self.start = 0, 0
        self.rank, self.ranks, self.batch = shard

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def _indices(self) -> torch.Tensor:
        indices = self.order()[self.start:self.stop]
        if self.ranks == 1:
            return indices
        positions = torch.arange(self.start, self.start + len(indices))
        per_rank = -(-self.batch // self.ranks)  # a last short batch is split as far as it goes
        return indices[(positions % self.batch) // per_rank == self.rank]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self._indices().tolist():
            yield self.epoch, i

    def __len__(self) -> int:
        if self.ranks == 1:
            return max(0, self.stop - self.start)
        return len(self._indices())


def to_model_input(images: torch.Tensor, device: torch.device,
                   normalize: bool | Normalize) -> torch.Tensor:
    """uint8 NCHW from the loader -> float on the device, in [0, 1] or ImageNet-normalised."""
    x = images.to(device, non_blocking=True).float().div_(255)
    norm = as_normalize(normalize)
    if norm is not None:
        mean = torch.tensor(norm.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(norm.std, device=device).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x
