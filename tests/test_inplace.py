"""Prepared packs read in place: the worker fetches a prepared pack's shards into its cache and
every input pipeline reads the samples at their offsets there (no file per image), in
ImageFolder's order; a stale pack is refreshed with its own settings where the worker can
write beside the folder; a pack that cannot serve the job (made for a smaller side, stale and
read only, broken) is one line and the job trains from the original files."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from structlog.testing import capture_logs

from cherry_train import datapack
from cherry_train.datapack import Encoding
from cherry_train.datapack.prepare import DEFAULT_CHROMA
from cherry_train.sizes import stored_side
from cherry_train.worker.inputs.data import _samples
from cherry_train.worker.inputs.datacache import cache_folder
from cherry_train.worker.inputs.gpudata import GpuBatches, decode_all
from cherry_train.worker.inputs.gpusplit import SplitBatches
from cherry_train.worker.inputs.gpustream import StreamedBatches
from cherry_train.worker.inputs.samples import EpochSampler, Transform
from cherry_train.worker.inputs.shardcache import LOCAL_INDEX, Wanted

SIZE = 32
WANTED = Wanted(SIZE, 0.5)


@pytest.fixture
def folder(tmp_path, photo_cherries) -> Path:
    src = tmp_path / "drive" / "train"
    shutil.copytree(photo_cherries / "train", src)
    return src


def prepare(folder: Path, image_size: int = SIZE, min_scale: float = 0.5,
            chroma: str = DEFAULT_CHROMA) -> datapack.PackIndex:
    """What `cherry data pack FOLDER --image-size N --min-crop-scale S` builds."""
    side = stored_side(image_size, min_scale)
    index, _, _ = datapack.pack_folder(folder, encoding=Encoding(side, chroma=chroma),
                                       prepared_for={"image_size": image_size,
                                                     "min_crop_scale": min_scale})
    return index


def pack_dir(folder: Path) -> Path:
    return folder.parent / f"{folder.name}{datapack.PACK_SUFFIX}"


def extracted(index: datapack.PackIndex, report, target: Path) -> Path:
    """The prepared samples written out as plain files: what reading in place must equal."""
    files = datapack.PackedFiles(index, Path(report.local))
    for rel in index.files:
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        (target / rel).write_bytes(files.read(rel))
    return target


def test_a_prepared_pack_is_read_in_place_in_imagefolders_order(folder, tmp_path):
    index = prepare(folder)
    report = cache_folder(folder, tmp_path / "cache", wanted=WANTED)
    assert report.way == "prepared" and report.pack == "current"
    assert report.files == 48 and report.copied_files == 48
    assert report.bytes == index.bytes and report.copied_bytes == index.bytes
    local = Path(report.local)
    on_disk = sorted(p.name for p in local.rglob("*") if p.is_file())
    assert on_disk == sorted([*index.shards, LOCAL_INDEX])  # no file per image
    packed = _samples(local, "data.train_path", Transform(SIZE, True), seed=5)
    plain = _samples(folder, "data.train_path", Transform(SIZE, True), seed=5)
    assert packed.classes == plain.classes
    assert packed.rels == [Path(p).relative_to(folder).as_posix() for p, _ in plain.samples]
    assert [label for _, label in packed.samples] == [label for _, label in plain.samples]
    again = cache_folder(folder, tmp_path / "cache", wanted=WANTED)
    assert again.way == "prepared" and again.copied_files == 0 and again.copied_bytes == 0


def test_every_pipeline_reads_the_pack_as_it_would_the_prepared_files(folder, tmp_path):
    index = prepare(folder)
    report = cache_folder(folder, tmp_path / "cache", wanted=WANTED)
    files_dir = extracted(index, report, tmp_path / "extracted")
    packed = _samples(Path(report.local), "f", Transform(SIZE, True), seed=5)
    plain = _samples(files_dir, "f", Transform(SIZE, True), seed=5)
    assert packed.packed is not None and plain.packed is None
    for i in (0, 17, 47):  # loader processes' path: PIL on the bytes
        assert torch.equal(packed[(1, i)][0], plain[(1, i)][0])
    cpu = torch.device("cpu")

    def gpu(samples):  # decoded once (on the CPU here)
        decoded = decode_all(samples, stored_side(SIZE, 0.5), cpu, 0)
        return GpuBatches(decoded, EpochSampler(48, 5, True), 16, SIZE, True, 0.5, 5, True,
                          drop_last=True)

    def stream(samples):  # decoded per batch
        return StreamedBatches(samples, EpochSampler(48, 5, True), 16, SIZE, True, 0.5, True,
                               drop_last=True, device=cpu)

    def split(samples):  # the first 20 decoded once, the rest per batch
        decoded = decode_all(samples, stored_side(SIZE, 0.5), cpu, 0, count=20)
        return SplitBatches(samples, decoded, EpochSampler(48, 5, True), 16, SIZE, True, 0.5,
                            True, drop_last=True)

    for make in (gpu, stream, split):
        a, b = make(packed), make(plain)
        a.sampler.set_position(2, 16)
        b.sampler.set_position(2, 16)
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_a_pack_for_a_smaller_side_is_said_and_the_files_are_copied(folder, tmp_path):
    prepare(folder, image_size=16)
    with capture_logs() as logs:
        report = cache_folder(folder, tmp_path / "cache", wanted=WANTED)
    assert report.way == "files" and report.copied_files == 48
    line = next(e["event"] for e in logs if e["log_level"] == "warning")
    assert "made for short side" in line and "--image-size 32" in line
    assert "training from the original files" in line
    assert (pack_dir(folder) / datapack.INDEX).exists()  # the user's pack is left as it is


def _flip_byte(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


def _corrupt_shard(folder: Path, index) -> str:
    name = sorted(index.shards)[0]
    rel = next(r for r, f in index.files.items() if f["shard"] == name)
    _flip_byte(pack_dir(folder) / name, index.files[rel]["offset"] + 100)
    return name


def _truncate_index(folder: Path, index) -> str:
    path = pack_dir(folder) / datapack.INDEX
    path.write_bytes(path.read_bytes()[:-200])
    return datapack.INDEX


def _undecodable_sample(folder: Path, index) -> str:
    """A sample replaced by bytes that are no JPEG, every hash made to match (a mis-built
    pack: its checks cannot catch it, the worker's look at each sample does)."""
    rel = sorted(index.files)[3]
    entry = index.files[rel]
    shard = pack_dir(folder) / entry["shard"]
    raw = bytearray(shard.read_bytes())
    raw[entry["offset"]:entry["offset"] + entry["length"]] = b"\0" * entry["length"]
    shard.write_bytes(bytes(raw))
    data = json.loads((pack_dir(folder) / datapack.INDEX).read_bytes())
    data["files"][rel]["sha256"] = hashlib.sha256(b"\0" * entry["length"]).hexdigest()
    data["shards"][entry["shard"]]["sha256"] = hashlib.sha256(raw).hexdigest()
    (pack_dir(folder) / datapack.INDEX).write_text(json.dumps(data))
    return rel


@pytest.mark.parametrize("breaks", [_corrupt_shard, _truncate_index, _undecodable_sample])
def test_a_broken_pack_is_one_line_and_the_job_trains_from_the_originals(folder, tmp_path,
                                                                         breaks):
    named = breaks(folder, prepare(folder))
    with capture_logs() as logs:
        report = cache_folder(folder, tmp_path / "cache", wanted=WANTED)
    assert report.way == "files" and report.copied_files == 48
    warnings = [e["event"] for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1
    assert named in warnings[0] and "rebuild" in warnings[0]
    assert "training from the original files" in warnings[0]
    assert not list((tmp_path / "cache").glob(f"*/prepared/{LOCAL_INDEX}"))
    samples = _samples(Path(report.local), "f", Transform(SIZE, True), seed=5)
    assert samples.packed is None and len(samples) == 48


@pytest.mark.parametrize("pipeline", ["workers", "gpu", "stream", "split"])
def test_training_from_a_prepared_pack_resumes_bit_identically(tmp_path, photo_cherries,
                                                               tiny_config, pipeline):
    """As test_training's deterministic resume test, the data read in place from the pack;
    the result says which way the data came."""
    from test_training import deterministic, straight_and_resumed

    roots = []
    for name in ("straight", "interrupted"):
        root = tmp_path / name
        shutil.copytree(photo_cherries, root / "data")
        for split in ("train", "val"):
            prepare(root / "data" / split)
        roots.append(root)
    # stopped mid-epoch 1 and mid-epoch 2 (3 steps of 16 each)
    straight, resumed = straight_and_resumed(roots, deterministic(tiny_config, pipeline, 0.5),
                                             stops=(2, 4))
    for result in (straight, resumed):
        assert result.data_cache["train"]["way"] == result.data_cache["val"]["way"] == "prepared"
    assert resumed.dataset_sha256 == straight.dataset_sha256


def _add_photo(folder: Path) -> None:
    first = sorted((folder / "good").iterdir())[0]
    (folder / "good" / "added.jpg").write_bytes(first.read_bytes())


def test_a_pack_older_than_the_folder_is_refreshed_with_its_settings(folder, tmp_path):
    """A photo added after the pack was made: the worker re-encodes that one, takes the
    other 48 from the old shards, and reads the refreshed pack in place."""
    before = prepare(folder)
    _add_photo(folder)
    (folder / "defect" / sorted(p.name for p in (folder / "defect").iterdir())[0]).unlink()
    with capture_logs() as logs:
        report = cache_folder(folder, tmp_path / "cache", wanted=WANTED)
    assert report.way == "prepared" and report.files == 48
    line = next(e for e in logs if e["event"].startswith("data pack refreshed"))
    assert (line["encoded"], line["reused"]) == (1, 47)
    after = datapack.FolderPackPlace(pack_dir(folder)).index()
    assert after.is_current(datapack.list_folder(folder))
    assert {k: after.prepared[k] for k in ("short_side", "quality", "image_size")} == \
        {k: before.prepared[k] for k in ("short_side", "quality", "image_size")}
    kept = sorted(before.files)[-1]  # a good one, unchanged: its stored bytes taken as they were
    assert after.files[kept]["sha256"] == before.files[kept]["sha256"]
    assert not [e for e in logs if e["log_level"] == "warning"]


def test_a_stale_pack_that_cannot_be_rebuilt_is_said_and_the_files_are_copied(folder, tmp_path):
    """Through an API root (read only to the worker) the stale pack cannot be refreshed: one
    line says what to do, and the job trains from the original files."""
    from cherry_train.storage import LocalStorage
    from cherry_train.worker.inputs.sources import StorageSource

    prepare(folder)
    _add_photo(folder)
    source = StorageSource(LocalStorage(folder.parent), folder.name)
    with capture_logs() as logs:
        report = cache_folder(source, tmp_path / "cache", wanted=WANTED)
    assert report.way == "files" and report.files == 49
    warnings = [e["event"] for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1 and "older than the folder" in warnings[0]
    assert "cherry data pack" in warnings[0]


def photo_dataset(root: Path, train: int, val: int, seed: int = 4) -> None:
    """The demo task at a camera's size: each cherry rendered as the demo renders it, a square
    frame (at 160 px: at full size rendering takes seconds per image), widened to the camera's
    4:3 by carrying the belt's edge columns sideways (the cherry is not stretched, and the
    centred square that validation takes is the demo's image), brought up to 1600x1200 and
    given sensor noise, so the JPEGs weigh what photos do (~0.4 MB)."""
    import numpy as np
    from PIL import Image

    from cherry_train.demo.cherries import CLASSES, DEFECTS, render_cherry

    rng = np.random.default_rng(seed)
    for split, count, offset in (("train", train, 0), ("val", val, 10_000)):
        for i in range(count):
            cls = CLASSES[i % 2]
            defect = None if cls == "good" else DEFECTS[i % 3]
            square = np.asarray(render_cherry(offset + i, defect, 160))
            frame = np.pad(square, ((0, 0), (26, 27), (0, 0)), mode="edge")  # 213x160
            photo = Image.fromarray(frame).resize((1600, 1200), Image.BICUBIC)
            pixels = np.asarray(photo, np.int16) + rng.integers(-6, 7, (1200, 1600, 1), np.int16)
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
                root / split / cls / f"{i:05d}.jpg", quality=90)


def parity_config(config: dict, epochs: int) -> dict:
    """`config` (the tests' tiny one: its seed, paths, no export) with the demo's recipe
    (demo_config: ResNet-18 at 48 px, AdamW, cosine, crops of at least 0.6 of the image) at
    batch 16: on half the demo's images that keeps its 38 steps an epoch (at 32 some seeds had
    not learned the task after 8 epochs: 0.67-0.86). `input_pipeline: workers` with one loader
    process: it decodes while the model trains (an original's full-size decode costs ~12 ms)."""
    from cherry_train.demo.run import DemoSize, demo_config

    demo = demo_config(DemoSize(epochs=epochs, batch_size=16))
    for part in ("model", "training", "augmentation"):
        config[part] = demo[part]
    config["data"].update(image_size=demo["data"]["image_size"], num_workers=1)
    config["performance"] = {"input_pipeline": "workers"}
    return config


def accuracy_from(photos: Path, root: Path, config: dict, way: str,
                  chroma: str = DEFAULT_CHROMA) -> float:
    """The final validation accuracy of `config` trained on a copy of `photos` in the queue
    root `root`, from the original files or (way "prepared") from a prepared pack of them."""
    from test_training import run_job

    shutil.copytree(photos, root / "data")
    if way == "prepared":
        for split in ("train", "val"):
            prepare(root / "data" / split, config["data"]["image_size"],
                    config["augmentation"]["min_crop_scale"], chroma)
    result = run_job(root, config)
    assert result.data_cache["train"]["way"] == way
    return result.final_metrics["val_accuracy"]


@pytest.mark.long
def test_training_from_prepared_photos_reaches_the_originals_accuracy(tmp_path, tiny_config):
    """Issue 24 goal 5, one seed of it: 600 + 200 photos at 1600x1200, 8 epochs (half the
    demo's set); both ways learn the task (>= 0.9: the demo reaches 0.95) and land within 3
    points of each other.

    Why 3 and not the goal's 1: two runs from the same seed and crop boxes still diverge (the
    originals are decoded at full size and resized, the pack's copies are 85x64 JPEGs). Over 8
    seeds the pack was 0.3 points above the files on average (the goal's figure, in
    docs/benchmarks.md), but per seed the difference spread with a standard deviation of 1.2
    points and reached 1.5 (a 200-image validation set counts in steps of 0.5; its binomial
    standard error at 0.95 is 1.5): one seed within 1 point would be luck, not evidence; 3 is
    2.5 standard deviations. What this one seed cannot tell apart, 4:2:0 packs' 2.4 points,
    test_datapack's test of the chroma guards. About 4 minutes on 2 cores."""
    config = parity_config(tiny_config, epochs=8)
    photo_dataset(tmp_path / "photos", train=600, val=200)
    files, prepared = (accuracy_from(tmp_path / "photos", tmp_path / way, config, way)
                       for way in ("files", "prepared"))
    print(f"val accuracy: files {files:.3f}, prepared pack {prepared:.3f}")
    assert min(files, prepared) >= 0.9
    assert abs(files - prepared) <= 0.03
