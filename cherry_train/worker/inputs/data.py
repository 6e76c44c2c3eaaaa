"""A job's batches: its prepared folders checked, the input pipeline chosen, and batches served
on the device, from loader processes (here), or decoded on the GPU (gpudata, gpustream,
gpusplit; which one: pipelines.py).

How each sample is read and augmented is in samples.py; the loader processes in loaders.py;
the folders found and copied onto this VM before this (the preparation path) in prepare.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import structlog
import torch
from torch.utils.data import DataLoader
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from cherry_train import datachecks
from cherry_train.schemas import TrainingConfig
from cherry_train.worker.errors import JobError
from cherry_train.worker.inputs import gpudata, gpufill, gpusplit, gpustream
from cherry_train.worker.inputs.loaders import (
    available_memory,
    loader_processes,
    shut_down,
    size_loader_pool,
    usable_cores,
    worker_context,
)
from cherry_train.worker.inputs.modelinput import input_normalize
from cherry_train.worker.inputs.pipelines import choose_pipeline, resident_count
from cherry_train.worker.inputs.samples import (
    EpochSampler,
    ImageFolderSamples,
    Normalize,
    Transform,
    to_model_input,
)
from cherry_train.worker.inputs.shardcache import local_pack

log = structlog.get_logger(__name__)

DEVELOPMENT_TRAIN_BATCHES = 8
DEVELOPMENT_VAL_BATCHES = 4


@dataclass
class Data:
    train: ImageFolderSamples
    val: ImageFolderSamples
    classes: list[str]
    batch_size: int
    num_workers: int
    pin_memory: bool
    steps_per_epoch: int
    val_limit: int | None  # development mode validates on a prefix only
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    normalize: Normalize | None = None
    pipeline: str = "workers"  # or "gpu", "split", "stream": see choose_pipeline
    resident_share: float | None = None  # "split": of each set, the share decoded in memory
    # A split's training share decoded while the job trains (gpufill.py), where the pixels a
    # step gets may depend on timing: not for deterministic jobs or a pinned share.
    grow: bool = False
    # Over several ranks (distributed.py) batch_size stays the global batch, and positions in
    # an epoch stay global; each rank loads its share of every batch.
    rank: int = 0
    ranks: int = 1

    _loaders: dict[str, DataLoader] = field(default_factory=dict)
    _gpu: dict = field(default_factory=dict)  # split -> gpudata.GpuBatches

    @property
    def rank_batch(self) -> int:
        return self.batch_size // self.ranks

    def _sampler(self, n: int, seed: int, shuffle: bool, stop: int | None) -> EpochSampler:
        return EpochSampler(n, seed, shuffle, stop, shard=(self.rank, self.ranks,
                                                           self.batch_size))

    def train_batches(self, epoch: int, start_step: int):
        """This epoch's batches from `start_step` on, as (x, y) on the device, model-ready."""
        if self.pipeline != "workers":
            return self._gpu_batches("train", epoch, start_step)
        return _OnDevice(self.train_loader(epoch, start_step), self.device, self.normalize)

    def val_batches(self):
        if self.pipeline != "workers":
            return self._gpu_batches("val", 0, 0)
        return _OnDevice(self.val_loader(), self.device, self.normalize)

    def train_loader(self, epoch: int, start_step: int) -> DataLoader:
        loader = self._loader("train", shuffle=True, stop=self.steps_per_epoch * self.batch_size)
        loader.sampler.set_position(epoch, start_step * self.batch_size)
        return loader

    def val_loader(self) -> DataLoader:
        return self._loader("val", shuffle=False, stop=self.val_limit)

    def _gpu_batches(self, split: str, epoch: int, start_step: int):
        if split not in self._gpu:
            n = len(self.train if split == "train" else self.val)
            resident = resident_count(self.pipeline, self.resident_share, n)
            self._gpu[split] = (self._streamed(split) if resident == 0 else
                                self._decoded(split, resident))
        batches = self._gpu[split]
        batches.sampler.set_position(epoch, start_step * self.batch_size)
        return batches

    def _streamed(self, split: str):
        dataset = self.train if split == "train" else self.val
        transform = dataset.transform
        stop = self.steps_per_epoch * self.batch_size if split == "train" else self.val_limit
        return gpustream.StreamedBatches(
            dataset, self._sampler(len(dataset), dataset.seed, split == "train", stop),
            self.rank_batch, transform.size, transform.augment, transform.min_scale,
            self.normalize, drop_last=split == "train", device=self.device,
            num_workers=self.num_workers)

    def _decoded(self, split: str, resident: int):
        """The first `resident` images decoded once, on first use (or while training: `grow`);
        the rest (if any) streamed in the same batches (gpusplit.py)."""
        dataset = self.train if split == "train" else self.val
        transform = dataset.transform
        side = gpudata.stored_side(transform.size, self.train.transform.min_scale)
        stop = self.steps_per_epoch * self.batch_size if split == "train" else self.val_limit
        sampler = self._sampler(len(dataset), dataset.seed, split == "train", stop)
        fill = None
        if self.grow and split == "train" and resident < len(dataset):
            fill = gpufill.Fill(dataset, side, self.device, resident)
            decoded = fill.decoded
        else:
            decoded = gpudata.decode_all(dataset, side, self.device, self.num_workers, resident)
            gpudata.say_decoded(split, decoded, len(dataset) - resident)
        if resident < len(dataset):
            return gpusplit.SplitBatches(
                dataset, decoded, sampler, self.rank_batch, transform.size, transform.augment,
                transform.min_scale, self.normalize, drop_last=split == "train",
                num_workers=self.num_workers, fill=fill)
        return gpudata.GpuBatches(
            decoded, sampler, self.rank_batch, transform.size, transform.augment,
            transform.min_scale, dataset.seed, self.normalize, drop_last=split == "train",
            num_workers=min(2, self.num_workers))

    def close(self) -> None:
        """Stop this job's loader processes now, not when the garbage collector reaches them:
        a long-lived worker would gather them job after job, and at exit, where they ignore
        SIGTERM, they would hold the process up."""
        for batches in self._gpu.values():
            if getattr(batches, "fill", None) is not None:
                batches.fill.stop()
        for loader in [*self._loaders.values(), *(b.loader for b in self._gpu.values())]:
            shut_down(loader)

    def _loader(self, split: str, shuffle: bool, stop: int | None) -> DataLoader:
        if split not in self._loaders:
            dataset = self.train if split == "train" else self.val
            workers = self.num_workers
            self._loaders[split] = DataLoader(
                dataset, batch_size=self.rank_batch,
                sampler=self._sampler(len(dataset), dataset.seed, shuffle, stop),
                drop_last=split == "train", num_workers=workers, pin_memory=self.pin_memory,
                persistent_workers=workers > 0,  # started once per job, not once per epoch
                **loader_processes(workers),
                # Every iter() draws a base seed; from the global RNG that would shift the
                # stream dropout uses whenever a resume starts an extra iterator mid-epoch.
                generator=torch.Generator().manual_seed(dataset.seed))
        return self._loaders[split]


class _OnDevice:
    """A DataLoader's uint8 batches, moved to the device as model input."""

    def __init__(self, loader: DataLoader, device: torch.device, normalize: Normalize | None):
        self.loader, self.device, self.normalize = loader, device, normalize

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels in self.loader:
            x = to_model_input(images, self.device, self.normalize)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, labels.to(self.device, non_blocking=True)


def _classes(path: Path, field: str, rels: list[str] | None) -> list[str]:
    """ImageFolder's classes: the folders below `path`, or of a prepared pack's files (those
    the cached copy of the folder would have, its files' folders)."""
    if not path.is_dir():
        raise JobError(datachecks.missing_folder(field, path))
    if rels is not None:
        classes = sorted({rel.split("/")[0] for rel in rels if "/" in rel})
        if not classes:
            raise JobError(datachecks.no_class_folders(field, path))
        return classes
    try:
        classes, _ = find_classes(str(path))
    except FileNotFoundError:
        raise JobError(datachecks.no_class_folders(field, path)) from None
    return classes


def _samples(path: Path, field: str, transform: Transform,
             seed: int) -> ImageFolderSamples:
    """The folder's samples: its files, or, for a prepared pack's folder in the cache, the
    pack's samples read in place."""
    packed = local_pack(path) if path.is_dir() else None
    packed, rels = packed or (None, None)
    classes = _classes(path, field, rels)
    return ImageFolderSamples(path, classes, transform, seed, packed=packed, rels=rels)


def load_data(cfg: TrainingConfig, train_path: Path, val_path: Path,
              device: torch.device, max_workers: int | None = None,
              rank: int = 0, ranks: int = 1) -> Data:
    """The job's data; `max_workers` caps the loader processes (after a loader process of the
    previous attempt died); over `ranks` processes, this rank's share of it."""
    aug = cfg.augmentation
    size = cfg.data.image_size
    train = _samples(train_path, "data.train_path",
                     Transform(size, aug.enabled, aug.min_crop_scale), cfg.seed)
    val = _samples(val_path, "data.val_path", Transform(size, augment=False), cfg.seed)
    train_classes = train.classes
    problems = datachecks.class_problems(train_classes, val.classes, cfg.model.num_classes)
    if problems:
        raise JobError(problems[0])
    for ds, name in ((train, "data.train_path"), (val, "data.val_path")):
        if len(ds) == 0:
            raise JobError(f"{name}: no images in {ds.root} (looked for "
                           f"{', '.join(IMG_EXTENSIONS[:4])}, ...)")
    batch = cfg.training.batch_size
    # Full batches only: a last batch of 1 breaks BatchNorm, and equal batches keep resume
    # offsets simple. A set smaller than one batch trains on one short batch.
    batch = min(batch, len(train))
    batch -= batch % ranks if batch >= ranks else 0  # every rank gets the same share
    steps = len(train) // batch
    val_limit = None
    if cfg.mode.value == "development":
        steps = min(steps, DEVELOPMENT_TRAIN_BATCHES)
        val_limit = DEVELOPMENT_VAL_BATCHES * batch
    workers = loader_pool(cfg.data.num_workers, device, batch, size, usable_cores(),
                          available_memory(), max_workers, ranks, said=rank == 0)
    if workers:
        worker_context()  # the loader processes' server starts importing now
    pipeline, share = choose_pipeline(cfg, device, train, val)
    return Data(train=train, val=val, classes=train_classes, batch_size=batch, rank=rank,
                ranks=ranks, num_workers=workers, pin_memory=device.type == "cuda",
                steps_per_epoch=steps,
                val_limit=val_limit, device=device, normalize=input_normalize(cfg),
                pipeline=pipeline, resident_share=share,
                grow=not cfg.deterministic and cfg.performance.resident_share is None)


def loader_pool(configured: int | None, device: torch.device, batch: int, size: int,
                cores: int, memory: int | None, max_workers: int | None = None, ranks: int = 1,
                said: bool = True) -> int:
    """How many loader processes a job's data gets (training and evaluation alike): sized to
    this VM's cores and RAM (processes.size_loader_pool), each rank its share, at most
    `max_workers` (after a loader process of the previous attempt died); logged with why."""
    memory = memory // ranks if memory is not None else None
    workers, why = size_loader_pool(configured, device.type == "cuda", batch // ranks, size,
                                    max(1, cores // ranks), memory)
    if max_workers is not None and workers > max_workers:
        workers, why = max_workers, ("one died in the previous attempt (killed for memory?): "
                                     "half as many")
    if said:
        log.info("loader processes", loader_processes=workers, why=why, configured=configured,
                 **({"per_rank": True} if ranks > 1 else {}))
    return workers
