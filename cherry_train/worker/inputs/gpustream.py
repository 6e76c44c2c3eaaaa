"""The streamed GPU input pipeline: JPEG bytes in, model-ready batches out, decoded per batch.

When the decoded set does not fit in GPU memory (gpudata.py's pipeline), the CPU would have to
decode every image every epoch: on a 2-core Colab VM that caps ResNet-50 at a few hundred
images/s while the GPU could train ten times faster, and nvJPEG on the GPU decodes far faster
than training needs. So, per batch:

1. loader processes (as few as the VM has cores) read each sample's file bytes from the local
   data cache and draw its crop box and flip, from the sample's own generator (seed, epoch,
   index) exactly as the loader path does (data.crop_box): cheap work, no pixel touched;
2. a thread decodes the batch's JPEGs with nvJPEG in one batched call (`decode_jpeg(...,
   device="cuda")`) on a side CUDA stream, and cuts every crop out of the full-size image
   with `roi_align` (one call per distinct image size, usually one per batch), then flips and
   normalises: while the model trains on the previous batch;
3. the training loop takes the batch after waiting for that stream's event.

Files nvJPEG cannot take (PNG, CMYK JPEGs) are decoded on the CPU by torchvision. The data
order and the augmentation draws are those of the other pipelines, so resume is exact within
this one; the pixels differ from the loader path's only by resampling (roi_align averages a
box, PIL filters it), which the `gpu` tests bound.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.ops import roi_align

from cherry_train.worker.inputs.gpudata import BatchFinish, by_shape
from cherry_train.worker.inputs.loaders import loader_processes
from cherry_train.worker.inputs.samples import (
    EpochSampler,
    ImageFolderSamples,
    crop_box,
    undecodable,
)

PREFETCH_BATCHES = 2  # decoded batches waiting for the model: enough to hide a slow one


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, or None if `data` is not a JPEG whose
    header this reads. Walks the markers: microseconds, where opening it with PIL takes ~0.1 ms
    and a loader process on a 2-core VM has ~0.2 ms per image to spare."""
    if data[:2] != b"\xff\xd8":
        return None
    at, n = 2, len(data)
    while at + 9 < n:
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            at += 2
            continue
        length = int.from_bytes(data[at + 2:at + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE,
                      0xCF):  # a start-of-frame: precision, height, width
            height = int.from_bytes(data[at + 5:at + 7], "big")
            width = int.from_bytes(data[at + 7:at + 9], "big")
            return (width, height) if width and height else None
        at += 2 + length
    return None


def image_size(data: bytes, path: str) -> tuple[int, int]:
    size = jpeg_size(data)
    if size is not None:
        return size
    from io import BytesIO

    from PIL import Image

    try:
        with Image.open(BytesIO(data)) as f:
            return f.size
    except (OSError, SyntaxError, ValueError) as e:
        raise undecodable(path, e) from None


class EncodedCrops(Dataset):
    """Item (epoch, index): the file's bytes and its crop row (x1, y1, x2, y2 in the original
    image's pixels, flip, index, is_jpeg)."""

    def __init__(self, samples: ImageFolderSamples, seed: int, augment: bool, min_scale: float):
        self.samples, self.seed = samples, seed
        self.augment, self.min_scale = augment, min_scale

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        path = self.samples.samples[index][0]
        data = self.samples.read(index)
        w, h = image_size(data, path)
        x1, y1, x2, y2, flip = crop_box(w, h, self.seed, epoch, index, self.augment,
                                        self.min_scale)
        jpeg = self.samples.is_jpeg(index) and data[:2] == b"\xff\xd8"
        row = torch.tensor([x1, y1, x2, y2, float(flip), index, float(jpeg)],
                           dtype=torch.float64)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), row


def _collate(items):
    """One flat byte tensor and its offsets: a loader process hands its batch over in two
    shared-memory blocks, where a list of 256 tensors would pass 256 file descriptors."""
    sizes = torch.tensor([len(data) for data, _ in items], dtype=torch.int64)
    offsets = torch.zeros(len(items) + 1, dtype=torch.int64)
    torch.cumsum(sizes, 0, out=offsets[1:])
    return torch.cat([data for data, _ in items]), offsets, torch.stack([row for _, row in items])


def split_flat(flat: torch.Tensor, offsets: torch.Tensor) -> list[torch.Tensor]:
    bounds = offsets.tolist()
    return [flat[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


class StreamedBatches:
    """Batches of one epoch, decoded from the files' bytes per batch: (x, y) ready for the
    model. Iterating yields the batches from the sampler's position on, like a DataLoader."""

    def __init__(self, samples: ImageFolderSamples, sampler: EpochSampler, batch_size: int,
                 out_size: int, augment: bool, min_scale: float, normalize: bool,
                 drop_last: bool, device: torch.device, num_workers: int = 0):
        self.sampler, self.device = sampler, device
        self.labels = torch.tensor([label for _, label in samples.samples], device=device)
        self.finish = BatchFinish(device, normalize)
        self.crop = DecodeAndCrop(samples, out_size, device)
        self.loader = encoded_loader(EncodedCrops(samples, samples.seed, augment, min_scale),
                                     sampler, batch_size, drop_last, num_workers, samples.seed)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iterate(self)

    def batch(self, flat: torch.Tensor, offsets: torch.Tensor, meta: torch.Tensor):
        """Decode, crop, flip and normalise one batch (on the current CUDA stream)."""
        x = self.crop(split_flat(flat, offsets), meta)
        idx = meta[:, 5].long().to(self.device)
        return self.finish(x, meta[:, 4]), self.labels.index_select(0, idx)


def encoded_loader(dataset: Dataset, sampler: EpochSampler, batch_size: int, drop_last: bool,
                   num_workers: int, seed: int) -> DataLoader:
    """The loader of a pipeline whose items are (bytes, crop row): batches as _collate packs
    them."""
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
        num_workers=num_workers, collate_fn=_collate, persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers else None, **loader_processes(num_workers),
        generator=torch.Generator().manual_seed(seed))  # as in gpudata.py


def iterate(batches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A pipeline's batches (its loader's, through its batch()): on CUDA made ahead on a
    side stream by _Prefetched, elsewhere in turn."""
    if batches.device.type != "cuda":
        for flat, offsets, meta in batches.loader:
            yield batches.batch(flat, offsets, meta)
        return
    yield from _Prefetched(batches)


class DecodeAndCrop:
    """Files' bytes and their crop rows (x1, y1, x2, y2 in the original image's pixels, flip,
    index, is_jpeg) -> the crops (float, 0..255, not yet flipped) on the device."""

    def __init__(self, samples: ImageFolderSamples, out_size: int, device: torch.device):
        self.samples, self.out_size, self.device = samples, out_size, device

    def __call__(self, encoded: list[torch.Tensor], meta: torch.Tensor) -> torch.Tensor:
        images = self._decode(encoded, meta)
        dtype = torch.half if self.device.type == "cuda" else torch.float  # 0..255 exact in it
        boxes = meta[:, :4].to(self.device, non_blocking=True)
        crops, order = [], []
        for members in by_shape(images).values():
            # One roi_align per image size: the images of that size stacked, one box each.
            stacked = torch.stack([images[k] for k in members]).to(dtype)
            where = torch.tensor(members, device=self.device)
            rois = torch.cat([torch.arange(len(members), device=self.device,
                                           dtype=boxes.dtype)[:, None],
                              boxes.index_select(0, where)], dim=1)
            crops.append(roi_align(stacked, rois.to(dtype),
                                   output_size=(self.out_size, self.out_size),
                                   spatial_scale=1.0, sampling_ratio=-1, aligned=True))
            order += members
        x = crops[0] if len(crops) == 1 else torch.cat(crops)
        if order != sorted(order):  # back into the batch's order
            x = x.index_select(0, torch.tensor(order, device=self.device).argsort())
        return x.float()

    def _decode(self, encoded: list[torch.Tensor], meta: torch.Tensor) -> list[torch.Tensor]:
        """CHW uint8 images on the device: JPEGs in one batched (nvJPEG) call, the rest and
        any JPEG it refuses on the CPU."""
        jpegs = [k for k in range(len(encoded)) if meta[k, 6] > 0.5]
        out: list[torch.Tensor | None] = [None] * len(encoded)
        if jpegs:
            try:
                decoded = decode_jpeg([encoded[k] for k in jpegs], mode=ImageReadMode.RGB,
                                      device=self.device)
                for k, img in zip(jpegs, decoded, strict=True):
                    out[k] = img
            except RuntimeError:  # one file it cannot take (CMYK, broken) fails the batch
                pass
        for k in range(len(encoded)):
            if out[k] is None:
                out[k] = self._decode_on_cpu(encoded[k], int(meta[k, 5]))
        return out

    def _decode_on_cpu(self, data: torch.Tensor, index: int) -> torch.Tensor:
        path = self.samples.samples[index][0]
        try:
            return decode_image(data, mode=ImageReadMode.RGB).to(self.device)
        except RuntimeError as e:
            raise undecodable(path, e) from None


class _Prefetched:
    """Runs a streaming pipeline's batch() on a thread with its own CUDA stream, PREFETCH_BATCHES
    ahead: decoding batch k+1 overlaps training on batch k. The consumer waits on each batch's
    event, so it never reads a batch before it is made; leaving the loop early (a stop
    request) ends the thread."""

    def __init__(self, batches: StreamedBatches):
        self.batches = batches
        self.ready: queue.Queue = queue.Queue(PREFETCH_BATCHES)
        self.closed = threading.Event()
        self.stream = torch.cuda.Stream(batches.device)
        self.thread = threading.Thread(target=self._produce, name="cherry-gpu-decode",
                                       daemon=True)

    def __iter__(self):
        self.thread.start()
        current = torch.cuda.current_stream(self.batches.device)
        try:
            while True:
                item = self.ready.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                (x, y), event = item
                current.wait_event(event)
                x.record_stream(current)  # made on the side stream, freed after use on this
                y.record_stream(current)
                yield x, y
        finally:
            self.closed.set()
            while self.thread.is_alive():  # unblock a producer waiting to put
                with contextlib.suppress(queue.Empty):
                    self.ready.get(timeout=0.1)

    def _produce(self) -> None:
        try:
            with torch.cuda.stream(self.stream):
                for flat, offsets, meta in self.batches.loader:
                    if self.closed.is_set():
                        return
                    batch = self.batches.batch(flat, offsets, meta)
                    event = torch.cuda.Event()
                    event.record(self.stream)
                    if not self._put((batch, event)):
                        return
            self._put(None)
        except BaseException as e:
            self._put(e)

    def _put(self, item) -> bool:
        while not self.closed.is_set():
            try:
                self.ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False


def jpeg_share(samples: ImageFolderSamples) -> float:
    """The share of files named as JPEGs: streaming pays off when nvJPEG decodes most."""
    if not samples.samples:
        return 0.0
    return float(np.mean([samples.is_jpeg(i) for i in range(len(samples))]))
