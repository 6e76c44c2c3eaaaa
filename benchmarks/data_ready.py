"""How long a fresh VM waits for its data: file by file vs. through a data pack, on a slow mount.

Builds a data folder of N JPEG files (two classes), then, for a VM with an empty cache:

1. file by file (data.pack: off): what every worker did before packs;
2. through the pack (built ahead, as `cherry data pack` does): unpacked into files;
3. through a prepared pack (`cherry data pack --image-size N`, built ahead for a copy of the
   folder made of hard links): its shards fetched whole and read in place, no file per image;

each with a simulated network mount: every file opened through it waits `--open-ms`
(CHERRY_SLOW=open:..., in the cache's copy and the pack's reads; `--stat-ms` slows each stat
of the listing too, which both ways pay alike). Then, with the data local, the time from
`load_data` to the first training batch on the CPU (ImageFolder scan, cache check, loader
start): what a job waits after its data is there.

    python benchmarks/data_ready.py [--files 60000] [--open-ms 20] [--stat-ms 0]
                                    [--image-size 224] [--work DIR]

With --work, a second run reuses the folders and packs the first made there (minutes on 2
cores) and times only the fresh VM's ways again.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from cherry_train import datapack
from cherry_train.sizes import stored_side
from cherry_train.worker.inputs.datacache import cache_folder
from cherry_train.worker.inputs.shardcache import Wanted


def make_folder(root: Path, files: int) -> None:
    """`files` JPEGs 500x375 like train_throughput.py's (~58 KB each): 16 distinct photos
    written round robin (their count and size are what the copy costs, not their pixels)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from train_throughput import _photo

    blobs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(16):
            _photo((Path(tmp) / f"{i}.jpg", i))
            blobs.append((Path(tmp) / f"{i}.jpg").read_bytes())
    for c in ("good", "defect"):
        (root / c).mkdir(parents=True)
    for i in range(files):
        (root / ("good", "defect")[i % 2] / f"{i:06d}.jpg").write_bytes(blobs[i % len(blobs)])


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def first_batch_seconds(train: Path) -> float:
    """load_data to the first batch, data already local (a job's start after the copy)."""
    import torch

    from cherry_train.schemas import validate_config
    from cherry_train.worker.inputs.data import load_data

    cfg = validate_config({
        "model": {"name": "resnet18", "num_classes": 2},
        "training": {"epochs": 1, "batch_size": 256, "learning_rate": 0.001},
        "data": {"train_path": str(train), "val_path": str(train), "image_size": 64,
                 "num_workers": 2}})
    started = time.perf_counter()
    data = load_data(cfg, train, train, torch.device("cpu"))
    next(iter(data.train_batches(0, 0)))
    seconds = time.perf_counter() - started
    data.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=60_000)
    parser.add_argument("--open-ms", type=float, default=20.0)
    parser.add_argument("--stat-ms", type=float, default=0.0)
    parser.add_argument("--image-size", type=int, default=224,
                        help="data.image_size the prepared pack is made for")
    parser.add_argument("--work", type=Path, help="working folder (default: a temp folder)")
    parser.add_argument("--cache", type=Path, help="where the VM's caches go (default: in the "
                        "working folder; /dev/shm takes the local disk's speed out)")
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="cherry-data-ready-"))
    folder = work / "drive" / "train"
    made = folder.is_dir()  # a --work folder of an earlier run: its folders and packs reused
    t, _ = timed(lambda: None if made else make_folder(folder, args.files))
    if made:
        for pack in ("off", "auto", "prepared"):
            shutil.rmtree((args.cache or work) / f"cache-{pack}", ignore_errors=True)
    size = sum(f.stat().st_size for f in folder.rglob("*.jpg"))
    print(f"{args.files} files, {size / 1e9:.2f} GB, made in {t:.0f} s; mount: "
          f"{args.open_ms:g} ms per open, {args.stat_ms:g} ms per stat; {os.cpu_count()} cores")
    t_pack, (index, _, _) = timed(lambda: datapack.pack_folder(folder))
    print(f"pack built ahead (not timed below, done once): {len(index.shards)} shards in "
          f"{t_pack:.0f} s")
    prepared_folder = work / "drive2" / "train"  # the same files: one pack per folder
    for src in [] if made else folder.rglob("*.jpg"):
        (prepared_folder / src.parent.name).mkdir(parents=True, exist_ok=True)
        os.link(src, prepared_folder / src.parent.name / src.name)
    side = stored_side(args.image_size, 0.5)
    t_prep, (prepared, _, _) = timed(lambda: datapack.pack_folder(
        prepared_folder, encoding=datapack.Encoding(side),
        prepared_for={"image_size": args.image_size, "min_crop_scale": 0.5}))
    print(f"prepared pack built ahead (not timed below): short side {side}, "
          f"{prepared.bytes / 1e9:.2f} GB ({prepared.bytes / size:.2f}x the originals), "
          f"{len(prepared.shards)} shards in {t_prep:.0f} s")

    os.environ["CHERRY_SLOW"] = f"open:{args.open_ms / 1000}" + \
        (f",stat:{args.stat_ms / 1000}" if args.stat_ms > 0 else "")
    rows = []
    wanted = Wanted(args.image_size, 0.5)
    for name, pack, where in (("file by file", "off", folder), ("data pack", "auto", folder),
                              ("prepared pack", "prepared", prepared_folder)):
        cache = (args.cache or work) / f"cache-{pack}"
        os.sync()  # the set-up's writes go to disk now, not during the timed copy
        t, report = timed(lambda p=pack, c=cache, w=where: cache_folder(
            w, c, pack="auto" if p == "prepared" else p,
            wanted=wanted if p == "prepared" else None))
        assert report.files == args.files
        rows.append((name, t, report))
    os.environ.pop("CHERRY_SLOW")
    assert rows[0][2].sha256 == rows[1][2].sha256, "both ways must give the same data"
    assert rows[2][2].way == "prepared", "the prepared pack must be read in place"
    base = rows[0][1]
    print("\n| a fresh VM's data ready | seconds | bytes copied | vs file by file |\n"
          "|---|---|---|---|")
    for name, t, report in rows:
        print(f"| {name} ({report.way}) | {t:.1f} | {report.copied_bytes / 1e9:.2f} GB | "
              f"{base / t:.1f}x |")

    local = Path(rows[1][2].local)
    os.sync()
    t_reuse, _ = timed(lambda: cache_folder(folder, (args.cache or work) / "cache-auto"))
    first = first_batch_seconds(local)
    print(f"\ndata local: cache check {t_reuse:.1f} s, load_data to first batch {first:.1f} s "
          f"(2 loader processes, 64 px): {t_reuse + first:.1f} s to the first step's data")
    t_reuse, _ = timed(lambda: cache_folder(prepared_folder, (args.cache or work) /
                                            "cache-prepared", wanted=wanted))
    first = first_batch_seconds(Path(rows[2][2].local))
    print(f"prepared pack local: cache check {t_reuse:.1f} s, load_data to first batch "
          f"{first:.1f} s: {t_reuse + first:.1f} s to the first step's data")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    if args.cache:
        for pack in ("off", "auto", "prepared"):
            shutil.rmtree(args.cache / f"cache-{pack}", ignore_errors=True)


if __name__ == "__main__":
    main()
