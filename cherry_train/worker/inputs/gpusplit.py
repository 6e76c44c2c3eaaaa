"""The split GPU input pipeline: the share of a set that fits in GPU memory decoded once and kept
there (gpudata.py), only the rest decoded per batch from its bytes (gpustream.py).

A set a little too large for the decoded cache would otherwise be streamed whole, every image
decoded every epoch, while most of it could stay decoded. Here samples 0..resident-1 (the
folder's order, so a sample's index is its row in the cache) are resident and the rest
streamed; the sampler's order deals both kinds into every batch. Each sample keeps the crop box
and flip of its (seed, epoch, index), and its pixels are bit for bit those the resident-only
(`gpu`) or the stream-only pipeline gives it: the data of a step does not depend on where a
run was resumed, and with the same split (performance.resident_share pins it) neither do the
weights of a deterministic job. Other jobs start training while the resident share is still
being decoded (gpufill.py): its samples are streamed until their rows are ready.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset

from cherry_train.worker.inputs.gpudata import BatchFinish, CropBoxes, DecodedImages, crop_decoded
from cherry_train.worker.inputs.gpufill import Fill
from cherry_train.worker.inputs.gpustream import (
    DecodeAndCrop,
    EncodedCrops,
    encoded_loader,
    iterate,
    split_flat,
)
from cherry_train.worker.inputs.samples import EpochSampler, ImageFolderSamples

_NO_BYTES = torch.empty(0, dtype=torch.uint8)


class SplitCrops(Dataset):
    """Item (epoch, index): a resident sample's row in stored coordinates (CropBoxes' row and
    is_jpeg 0) and no bytes; a streamed sample's file bytes and row (EncodedCrops'). While a
    Fill decodes the resident share, a resident sample whose row is not ready yet is streamed."""

    def __init__(self, samples: ImageFolderSamples, decoded: DecodedImages, augment: bool,
                 min_scale: float, ready: torch.Tensor | None = None):
        self.resident, self.ready = len(decoded.sizes), ready
        self.boxes = CropBoxes(decoded.sizes, decoded.side, samples.seed, augment, min_scale)
        self.encoded = EncodedCrops(samples, samples.seed, augment, min_scale)

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, key: tuple[int, int]):
        index = key[1]
        if index < self.resident and (self.ready is None or self.ready[index]):
            return _NO_BYTES, torch.cat([self.boxes[key], torch.zeros(1, dtype=torch.float64)])
        return self.encoded[key]


class SplitBatches:
    """Batches of one epoch, the resident share cut from the decoded cache and the rest decoded
    from bytes: (x, y) ready for the model. Iterating yields the batches from the sampler's
    position on, like a DataLoader; on CUDA made ahead on a side stream (gpustream)."""

    def __init__(self, samples: ImageFolderSamples, decoded: DecodedImages,
                 sampler: EpochSampler, batch_size: int, out_size: int, augment: bool,
                 min_scale: float, normalize: bool, drop_last: bool, num_workers: int = 0,
                 fill: Fill | None = None):
        self.decoded, self.sampler, self.out_size, self.fill = decoded, sampler, out_size, fill
        self.device = decoded.images.device
        self.labels = torch.tensor([label for _, label in samples.samples], device=self.device)
        self.finish = BatchFinish(self.device, normalize)
        self.crop = DecodeAndCrop(samples, out_size, self.device)
        crops = SplitCrops(samples, decoded, augment, min_scale, fill and fill.ready)
        self.loader = encoded_loader(crops, sampler, batch_size, drop_last, num_workers,
                                     samples.seed)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = iterate(self)
        try:
            for k, batch in enumerate(batches):
                yield batch
                if k == 0 and self.fill is not None:  # the first step is under way
                    self.fill.start()
        finally:
            batches.close()  # leaving early ends the side stream's thread now, as before

    def batch(self, flat: torch.Tensor, offsets: torch.Tensor, meta: torch.Tensor):
        """Crop the resident samples from the cache, decode and crop the streamed ones, put
        them back in the batch's order, then flip and normalise all at once."""
        if self.fill is not None:
            self.fill.check()
        resident = offsets[1:] == offsets[:-1]  # no bytes: cut from the cache
        here = resident.nonzero().flatten()
        away = (~resident).nonzero().flatten()
        x = torch.empty((len(meta), 3, self.out_size, self.out_size), device=self.device)
        if len(here):
            rows = meta.index_select(0, here).to(self.device, non_blocking=True)
            x[here.to(self.device)] = crop_decoded(self.decoded.images, rows, self.out_size)
        if len(away):
            encoded = split_flat(flat, offsets)
            x[away.to(self.device)] = self.crop([encoded[k] for k in away.tolist()],
                                                meta.index_select(0, away))
        idx = meta[:, 5].long().to(self.device)
        return self.finish(x, meta[:, 4]), self.labels.index_select(0, idx)
