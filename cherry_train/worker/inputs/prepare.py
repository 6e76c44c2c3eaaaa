"""Preparing a job's data before training, top to bottom: which folders the config names,
where they are (this machine's file system or a Drive API root), whether they are copied, the
copy into the local cache (datacache.py: file by file, or from the folder's pack), and what
the result records about it. Serving batches from the prepared folders is data.py's.

The steps, in the order `prepare_data` takes them:

1. `data.cache: false` and every folder on this machine: train where the data is, no copy.
2. Otherwise the copy is announced (`copying()`: minutes, through a mount), then
3. an archive (`data.archive`) is copied as one file and extracted; the paths are inside it;
4. or each folder (train, val) is found (`source_for`: local, or through the storage) and
   cached (`cache_folder`): a prepared pack that serves the job's image size has its shards
   fetched, to be read in place (shardcache.py); else the files are copied (from a verbatim
   pack, or one by one). The result records each folder's report (which way the data came,
   its bytes) and one hash of both.

Also here: `local_file`, the same mapping for a single file a config names (pretrained or
evaluated weights), downloaded first when it is remote.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from cherry_train import datachecks
from cherry_train.jobqueue.layout import best_for_final, weights_here
from cherry_train.places import PathMappingError, map_data_path, remote_location
from cherry_train.safepaths import UnsafePath, inside
from cherry_train.schemas import TrainingConfig
from cherry_train.storage.base import Storage
from cherry_train.worker.errors import JobError
from cherry_train.worker.inputs.datacache import cache_folder, default_cache_dir
from cherry_train.worker.inputs.shardcache import Wanted
from cherry_train.worker.inputs.sources import LocalSource, Source, StorageSource

SPLITS = ("train_path", "val_path")


def prepare_data(cfg: TrainingConfig, data_root: Path | None, storage: Storage,
                 copying: Callable[[], None]):
    """The local folders to train from, after copying the data into the cache (unless
    data.cache is false and the data is on this machine), and what the result records.
    `copying()` is called before a copy starts: minutes, on a first copy through the mount."""
    d = cfg.data
    if not d.cache and not any(remote_location(getattr(d, name), data_root, storage)
                               for name in SPLITS):
        return (resolve_path(d.train_path, "data.train_path", data_root),
                resolve_path(d.val_path, "data.val_path", data_root), {})
    copying()
    cache_dir = default_cache_dir()
    if d.archive:
        report = cache_folder(source_for(d.archive, "data.archive", data_root, storage),
                              cache_dir)
        base = Path(report.local)
        info = {"dataset_sha256": report.sha256, "archive": asdict(report)}
        return base / d.train_path, base / d.val_path, info
    # A prepared pack large enough for this job is read in place (shardcache.py).
    wanted = Wanted(d.image_size, cfg.augmentation.min_crop_scale)
    reports = {}
    for name in SPLITS:
        src = source_for(getattr(d, name), f"data.{name}", data_root, storage)
        if not src.exists():
            raise JobError(datachecks.missing_folder(f"data.{name}", src.label))
        reports[name.removesuffix("_path")] = cache_folder(src, cache_dir, pack=d.pack,
                                                           wanted=wanted)
    combined = hashlib.sha256(f"{reports['train'].sha256}\n{reports['val'].sha256}".encode())
    info = {"dataset_sha256": combined.hexdigest(), **{k: asdict(r) for k, r in reports.items()}}
    return Path(reports["train"].local), Path(reports["val"].local), info


def source_for(path: str, field_name: str, root: Path | None, storage: Storage) -> Source:
    """What to cache for a config's data path: a folder here, or one in Drive (API roots)."""
    remote = remote_location(path, root, storage)
    if remote is not None:
        return StorageSource(*remote)
    return LocalSource(resolve_path(path, field_name, root))


def resolve_path(path: str, field_name: str, root: Path | None) -> Path:
    """Where a config's path is on this machine (the path mapping of docs/contract.md §7); a path
    that cannot be mapped is the user's to fix, named by its field."""
    try:
        return map_data_path(path, root)
    except PathMappingError as e:
        raise JobError(f"{field_name}: {e}") from None


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
