"""ImageFolder data with augmentation that is a pure function of (seed, epoch, sample index).

Why not torchvision's transforms as they are: they draw from the global RNG, whose state
depends on which DataLoader process handled which batch. Seeding each sample's randomness
from (seed, epoch, index) makes the data of step k the same in an uninterrupted run and in one
resumed at step k, whatever `num_workers` is — which is what exact resume needs.

Samples leave the loader as uint8 tensors (4x less to copy than float); `to_model_input`
converts and normalises them on the training device.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import structlog
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from cherry_train import faults
from cherry_train.jobqueue.roots import PathMappingError, map_data_path, remote_location
from cherry_train.schemas import TrainingConfig
from cherry_train.storage.base import Storage
from cherry_train.worker.datacache import LocalSource, Source, StorageSource
from cherry_train.worker.errors import JobError
from cherry_train.worker.runtime import STOP_SIGNALS

log = structlog.get_logger(__name__)

JPEG_SUFFIXES = (".jpg", ".jpeg")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


class ImageFolderSamples(Dataset):
    """An ImageFolder whose items are looked up by (epoch, index)."""

    def __init__(self, root: Path, classes: list[str], transform: Transform, seed: int):
        self.root = root
        self.classes = classes
        self.samples = make_dataset(str(root), {c: i for i, c in enumerate(classes)},
                                    extensions=IMG_EXTENSIONS)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        path, label = self.samples[index]
        faults.slow("decode")
        try:
            with Image.open(path) as f:
                img = f.convert("RGB")
        except (OSError, SyntaxError, ValueError) as e:  # what PIL raises for broken files
            raise undecodable(path, e) from None
        rng = np.random.default_rng((self.seed, epoch, index))
        return self.transform(img, rng), label


class EpochSampler(Sampler):
    """Yields (epoch, index): a permutation regenerated from (seed, epoch), from `start` on.

    The position is set before each pass (like DistributedSampler.set_epoch), so one loader
    with persistent worker processes serves every epoch and every resume point."""

    def __init__(self, n: int, seed: int, shuffle: bool, stop: int | None = None):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.stop = n if stop is None else min(stop, n)
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self.order()[self.start:self.stop].tolist():
            yield self.epoch, i

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


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
    normalize: bool = True
    pipeline: str = "workers"  # or "gpu": see gpudata.py

    _loaders: dict[str, DataLoader] = field(default_factory=dict)
    _gpu: dict = field(default_factory=dict)  # split -> gpudata.GpuBatches

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
        from cherry_train.worker.gpustream import StreamedBatches

        dataset = self.train if split == "train" else self.val
        transform = dataset.transform
        stop = self.steps_per_epoch * self.batch_size if split == "train" else self.val_limit
        return StreamedBatches(
            dataset, EpochSampler(len(dataset), dataset.seed, split == "train", stop),
            self.batch_size, transform.size, transform.augment, transform.min_scale,
            self.normalize, drop_last=split == "train", device=self.device,
            num_workers=self.num_workers)

    def _decoded(self, split: str):
        from cherry_train.worker import gpudata

        dataset = self.train if split == "train" else self.val  # decoded once, on first use
        transform = dataset.transform
        side = gpudata.stored_side(transform.size, self.train.transform.min_scale)
        decoded = gpudata.decode_all(dataset, side, self.device, self.num_workers)
        log.info("images decoded into memory", split=split, images=len(dataset), side=side,
                 megabytes=round(decoded.images.numel() / 2**20),
                 seconds=round(decoded.seconds, 1), device=str(self.device))
        stop = self.steps_per_epoch * self.batch_size if split == "train" else self.val_limit
        return gpudata.GpuBatches(
            decoded, EpochSampler(len(dataset), dataset.seed, split == "train", stop),
            self.batch_size, transform.size, transform.augment, transform.min_scale,
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
                dataset, batch_size=self.batch_size,
                sampler=EpochSampler(len(dataset), dataset.seed, shuffle, stop),
                drop_last=split == "train", num_workers=workers, pin_memory=self.pin_memory,
                persistent_workers=workers > 0,  # started once per job, not once per epoch
                **loader_processes(workers),
                # Every iter() draws a base seed; from the global RNG that would shift the
                # stream dropout uses whenever a resume starts an extra iterator mid-epoch.
                generator=torch.Generator().manual_seed(dataset.seed))
        return self._loaders[split]


class _OnDevice:
    """A DataLoader's uint8 batches, moved to the device as model input."""

    def __init__(self, loader: DataLoader, device: torch.device, normalize: bool):
        self.loader, self.device, self.normalize = loader, device, normalize

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels in self.loader:
            x = to_model_input(images, self.device, self.normalize)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, labels.to(self.device, non_blocking=True)


def ignore_stop_signals(_worker_id: int | None = None) -> None:
    """Loader processes ignore stop signals (a DataLoader worker_init_fn). The main process
    ends them when it is done with them."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def loader_processes(num_workers: int) -> dict:
    """DataLoader arguments for `num_workers` loader processes: where they start, and that
    they leave stopping to the main process."""
    if not num_workers:
        return {}
    return {"multiprocessing_context": worker_context(), "worker_init_fn": ignore_stop_signals}


def shut_down(loader: DataLoader) -> None:
    """End a DataLoader's persistent loader processes (each gets its end-of-work message and
    exits by itself; torch's own shutdown, which its iterator otherwise runs when collected)."""
    iterator = getattr(loader, "_iterator", None)
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    loader._iterator = None


def worker_context() -> multiprocessing.context.BaseContext | None:
    """Where loader processes start: a fork server, never a fork of this process (its heartbeat
    thread could hold a lock at fork time and deadlock the child).

    The server imports torch and the data modules once, so each loader process starts in a
    fraction of a second instead of importing them itself (on the 2-core dev VM: a second pair
    of loader processes 0.1 s instead of 6-8 s; eight of them on a small Colab VM would import
    torch eight times over on two cores). The first call starts the server, whose imports then
    run while the job builds its model and decodes its images.

    The server is started with the stop signals ignored, which it keeps across its exec and
    hands to every process it forks: a signal to the process group then neither kills it (no
    loader could start after that) nor a loader between its fork and its worker_init_fn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    from multiprocessing import forkserver

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["cherry_train.worker.gpudata"])  # imports this module too
    with _stop_signals_ignored():
        forkserver.ensure_running()
    return context


@contextmanager
def _stop_signals_ignored():
    """Ignore the stop signals in this process while the body starts a child. A signal that
    arrives meanwhile is lost, which for starting one process is a few milliseconds."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal.signal only works there; the notebook and the CLI train on it
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


DEVELOPMENT_TRAIN_BATCHES = 8
DEVELOPMENT_VAL_BATCHES = 4


def usable_cores() -> int:
    """The cores this process may run on (a container or `taskset` may allow fewer than the
    machine has: os.cpu_count() would count them all)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


#: What one loader process costs in RAM besides its batches: a forked Python with torch,
#: PIL and numpy imported (about 350 MB resident measured on the dev VM), with headroom.
LOADER_PROCESS_BYTES = 500 << 20


def available_memory() -> int | None:
    """RAM this process may still use: the kernel's MemAvailable, or less if a cgroup limit
    (a container) leaves less. None where neither can be read."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit != "max":
            found.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def size_loader_pool(configured: int | None, on_gpu: bool, batch_size: int, image_size: int,
                     cores: int, free: int | None) -> tuple[int, str]:
    """How many loader processes, and why: on a GPU as many as the cores this process may use
    (at most 8), on the CPU none (training needs the cores); never more than the cores (a
    Colab VM has 2: eight decoders there only fight over them), nor more than half the
    available RAM (`free` bytes) holds: each is a whole Python with torch, plus its prefetched
    batches."""
    if configured is not None:
        wanted, why = configured, "data.num_workers"
    elif on_gpu:
        wanted, why = min(8, cores), f"{cores} usable cores"
    else:
        return 0, "training on the CPU needs its cores"
    if wanted > cores:
        wanted, why = cores, f"capped at the {cores} cores this process may use"
    if wanted and free is not None:
        each = LOADER_PROCESS_BYTES + 2 * batch_size * 3 * image_size * image_size  # prefetch 2
        fits = max(1, int(free / 2 // each))
        if fits < wanted:
            wanted, why = fits, (f"capped by RAM: {free / 2**30:.1f} GiB available, about "
                                 f"{each / 2**20:.0f} MiB each")
    return wanted, why


def resolve_path(path: str, field_name: str, root: Path | None) -> Path:
    """Where a config's path is on this machine (the path mapping of DESIGN.md §5); a path
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
    """A single file named by the config (weights), downloaded first if it is remote."""
    remote = remote_location(path, root, storage)
    if remote is None:
        return resolve_path(path, field_name, root)
    where, remote_path = remote
    target = scratch / "inputs" / Path(path).name
    try:
        where.download(remote_path, target)
    except FileNotFoundError:
        raise JobError(f"{field_name}: {path} does not exist under "
                       f"{where.description}") from None
    return target


def _classes(path: Path, field: str) -> list[str]:
    if not path.is_dir():
        raise JobError(f"{field}: folder {path} does not exist")
    try:
        classes, _ = find_classes(str(path))
    except FileNotFoundError:
        raise JobError(f"{field}: {path} has no class folders (expected one folder per class, "
                       "e.g. good/ and defect/)") from None
    return classes


def load_data(cfg: TrainingConfig, train_path: Path, val_path: Path,
              device: torch.device, max_workers: int | None = None) -> Data:
    """The job's data; `max_workers` caps the loader processes (after a loader process of the
    previous attempt died)."""
    train_classes = _classes(train_path, "data.train_path")
    val_classes = _classes(val_path, "data.val_path")
    if train_classes != val_classes:
        raise JobError(f"data.val_path: class folders {val_classes} differ from "
                       f"data.train_path's {train_classes}")
    if len(train_classes) != cfg.model.num_classes:
        raise JobError(f"model.num_classes: is {cfg.model.num_classes}, but data.train_path "
                       f"has {len(train_classes)} class folders: {', '.join(train_classes)}")
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
    steps = len(train) // batch
    val_limit = None
    if cfg.mode.value == "development":
        steps = min(steps, DEVELOPMENT_TRAIN_BATCHES)
        val_limit = DEVELOPMENT_VAL_BATCHES * batch
    workers, why = size_loader_pool(cfg.data.num_workers, device.type == "cuda", batch, size,
                                    usable_cores(), available_memory())
    if max_workers is not None and workers > max_workers:
        workers, why = max_workers, ("one died in the previous attempt (killed for memory?): "
                                     "half as many")
    log.info("loader processes", loader_processes=workers, why=why,
             configured=cfg.data.num_workers)
    if workers:
        worker_context()  # the loader processes' server starts importing now
    return Data(train=train, val=val, classes=train_classes, batch_size=batch,
                num_workers=workers, pin_memory=device.type == "cuda", steps_per_epoch=steps,
                val_limit=val_limit, device=device, normalize=aug.normalize,
                pipeline=choose_pipeline(cfg, device, train, val))


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
    from cherry_train.worker import gpudata, gpustream

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


def to_model_input(images: torch.Tensor, device: torch.device, normalize: bool) -> torch.Tensor:
    """uint8 NCHW from the loader -> float on the device, in [0, 1] or ImageNet-normalised."""
    x = images.to(device, non_blocking=True).float().div_(255)
    if normalize:
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x
