"""A job's data: its folders found and checked, the input pipeline chosen, and batches served
on the device, from loader processes (here), or decoded on the GPU (gpudata, gpustream).

How each sample is read and augmented is in samples.py; the loader processes in loaders.py;
the copy of the data onto this VM in datacache.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import structlog
import torch
from torch.utils.data import DataLoader
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from cherry_train import datachecks
from cherry_train.jobqueue.layout import best_for_final, weights_here
from cherry_train.places import PathMappingError, map_data_path, remote_location
from cherry_train.safepaths import UnsafePath, inside
from cherry_train.schemas import TrainingConfig
from cherry_train.storage.base import Storage
from cherry_train.worker.errors import JobError
from cherry_train.worker.inputs import gpudata, gpustream
from cherry_train.worker.inputs.datacache import cache_folder, default_cache_dir
from cherry_train.worker.inputs.loaders import (
    available_memory,
    loader_processes,
    shut_down,
    size_loader_pool,
    usable_cores,
    worker_context,
)
from cherry_train.worker.inputs.modelinput import input_normalize
from cherry_train.worker.inputs.samples import (
    EpochSampler,
    ImageFolderSamples,
    Normalize,
    Transform,
    to_model_input,
)
from cherry_train.worker.inputs.sources import LocalSource, Source, StorageSource

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
    pipeline: str = "workers"  # or "gpu": see gpudata.py
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
            self._gpu[split] = (self._streamed if self.pipeline == "stream" else
                                self._decoded)(split)
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

    def _decoded(self, split: str):
        dataset = self.train if split == "train" else self.val  # decoded once, on first use
        transform = dataset.transform
        side = gpudata.stored_side(transform.size, self.train.transform.min_scale)
        decoded = gpudata.decode_all(dataset, side, self.device, self.num_workers)
        log.info("images decoded into memory", split=split, images=len(dataset), side=side,
                 megabytes=round(decoded.images.numel() / 2**20),
                 seconds=round(decoded.seconds, 1), device=str(self.device))
        stop = self.steps_per_epoch * self.batch_size if split == "train" else self.val_limit
        return gpudata.GpuBatches(
            decoded, self._sampler(len(dataset), dataset.seed, split == "train", stop),
            self.rank_batch, transform.size, transform.augment, transform.min_scale,
            dataset.seed, self.normalize, drop_last=split == "train",
            num_workers=min(2, self.num_workers))

    def close(self) -> None:
        """Stop this job's loader processes now, not when the garbage collector reaches them:
        a long-lived worker would gather them job after job, and at exit, where they ignore
        SIGTERM, they would hold the process up."""
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


def resolve_path(path: str, field_name: str, root: Path | None) -> Path:
    """Where a config's path is on this machine (the path mapping of docs/contract.md §7); a path
    that cannot be mapped is the user's to fix, named by its field."""
    try:
        return map_data_path(path, root)
    except PathMappingError as e:
        raise JobError(f"{field_name}: {e}") from None


def source_for(path: str, field_name: str, root: Path | None, storage: Storage) -> Source:
    """What to cache for a config's data path: a folder here, or one in Drive (API roots)."""
    remote = remote_location(path, root, storage)
    if remote is not None:
        return StorageSource(*remote)
    return LocalSource(resolve_path(path, field_name, root))


def local_file(path: str, field_name: str, root: Path | None, storage: Storage,
               scratch: Path) -> Path:
    """A single file named by the config (weights), downloaded first if it is remote. A
    finished job's final.pt that is its best.pt (no copy kept) is read from best.pt."""
    remote = remote_location(path, root, storage)
    if remote is None:
        return weights_here(resolve_path(path, field_name, root))
    where, remote_path = remote
    try:  # the config is the queue's: its last part ('..', say) must not leave scratch
        target = inside(scratch / "inputs", Path(path).name, field_name)
    except UnsafePath as e:
        raise JobError(str(e)) from None
    try:
        where.download(remote_path, target)
    except FileNotFoundError:
        best = best_for_final(remote_path, where.read_text_or_none)
        if best is None or not where.exists(best):
            raise JobError(f"{field_name}: {path} does not exist under "
                           f"{where.description}") from None
        where.download(best, target)
    return target


def _classes(path: Path, field: str) -> list[str]:
    if not path.is_dir():
        raise JobError(datachecks.missing_folder(field, path))
    try:
        classes, _ = find_classes(str(path))
    except FileNotFoundError:
        raise JobError(datachecks.no_class_folders(field, path)) from None
    return classes


def load_data(cfg: TrainingConfig, train_path: Path, val_path: Path,
              device: torch.device, max_workers: int | None = None,
              rank: int = 0, ranks: int = 1) -> Data:
    """The job's data; `max_workers` caps the loader processes (after a loader process of the
    previous attempt died); over `ranks` processes, this rank's share of it."""
    train_classes = _classes(train_path, "data.train_path")
    val_classes = _classes(val_path, "data.val_path")
    problems = datachecks.class_problems(train_classes, val_classes, cfg.model.num_classes)
    if problems:
        raise JobError(problems[0])
    aug = cfg.augmentation
    size = cfg.data.image_size
    train = ImageFolderSamples(train_path, train_classes,
                               Transform(size, aug.enabled, aug.min_crop_scale), cfg.seed)
    val = ImageFolderSamples(val_path, val_classes, Transform(size, augment=False), cfg.seed)
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
    return Data(train=train, val=val, classes=train_classes, batch_size=batch, rank=rank,
                ranks=ranks, num_workers=workers, pin_memory=device.type == "cuda",
                steps_per_epoch=steps,
                val_limit=val_limit, device=device, normalize=input_normalize(cfg),
                pipeline=choose_pipeline(cfg, device, train, val))


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


def choose_pipeline(cfg: TrainingConfig, device: torch.device, train: ImageFolderSamples,
                    val: ImageFolderSamples) -> str:
    """performance.input_pipeline; auto: the decoded cache in GPU memory if it fits, else
    JPEGs streamed through nvJPEG per batch, else loader processes. The choice is logged with
    its reason: it decides the job's speed on a small VM."""
    wanted = cfg.performance.input_pipeline
    if wanted != "auto":
        log.info("input pipeline", pipeline=wanted, why="performance.input_pipeline")
        return wanted
    if device.type != "cuda":
        log.info("input pipeline", pipeline="workers", why="not on a CUDA device")
        return "workers"
    side = gpudata.stored_side(cfg.data.image_size, cfg.augmentation.min_crop_scale)
    need = gpudata.decoded_bytes(len(train) + len(val), side)
    free, _ = torch.cuda.mem_get_info(device)
    facts = {"decoded_megabytes": round(need / 2**20), "gpu_free_megabytes": round(free / 2**20),
             "side": side}
    if need <= free * gpudata.GPU_SHARE:
        log.info("input pipeline", pipeline="gpu", why="the decoded images fit in a third of "
                 "the free GPU memory", **facts)
        return "gpu"
    share = gpustream.jpeg_share(train)
    if share >= 0.5:
        log.info("input pipeline", pipeline="stream", why="the decoded images would not fit "
                 "in a third of the free GPU memory: JPEGs decoded on the GPU per batch",
                 jpeg_share=round(share, 3), **facts)
        return "stream"
    log.info("input pipeline", pipeline="workers", why="the decoded images would not fit in "
             "GPU memory and most files are not JPEGs (nvJPEG decodes only those)",
             jpeg_share=round(share, 3), **facts)
    return "workers"


def prepare_data(cfg: TrainingConfig, data_root: Path | None, storage: Storage,
                 copying: Callable[[], None]):
    """The local folders to train from, after copying the data into the cache (unless
    data.cache is false and the data is on this machine), and what the result records.
    `copying()` is called before a copy starts: minutes, on a first copy through the mount."""
    d = cfg.data

    def source(name: str) -> Source:
        return source_for(getattr(d, name), f"data.{name}", data_root, storage)

    if not d.cache and not any(remote_location(p, data_root, storage)
                               for p in (d.train_path, d.val_path)):
        return (resolve_path(d.train_path, "data.train_path", data_root),
                resolve_path(d.val_path, "data.val_path", data_root), {})
    copying()
    cache_dir = default_cache_dir()
    if d.archive:
        report = cache_folder(source("archive"), cache_dir)
        base = Path(report.local)
        info = {"dataset_sha256": report.sha256, "archive": asdict(report)}
        return base / d.train_path, base / d.val_path, info
    reports = {}
    for name in ("train_path", "val_path"):
        src = source(name)
        if not src.exists():
            raise JobError(datachecks.missing_folder(f"data.{name}", src.label))
        reports[name.removesuffix("_path")] = cache_folder(src, cache_dir, pack=d.pack)
    combined = hashlib.sha256(f"{reports['train'].sha256}\n{reports['val'].sha256}".encode())
    info = {"dataset_sha256": combined.hexdigest(), **{k: asdict(r) for k, r in reports.items()}}
    return Path(reports["train"].local), Path(reports["val"].local), info
