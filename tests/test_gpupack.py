"""Prepared packs built by torchvision on a device (`cherry data pack --device cuda`): the same
pack Pillow builds (image sizes, skipped files and their errors, index, verification), what
the device cannot take done by Pillow, an encode that does not decode back never stored. Run
through torchvision on the CPU here; the `gpu` test at the end runs it on CUDA."""

from __future__ import annotations

import io
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from pictures import jpeg, mixed_folder
from PIL import Image
from structlog.testing import capture_logs

from cherry_train import datapack
from cherry_train.cli import main
from cherry_train.datapack import gpuencode
from cherry_train.datapack.gpuencode import DeviceEncoder
from cherry_train.datapack.prepare import Prepared, prepare_bytes
from cherry_train.sizes import stored_side
from cherry_train.worker.inputs.datacache import cache_folder
from cherry_train.worker.inputs.shardcache import Wanted

#: torchvision's encoder on the CPU subsamples chroma 4:2:0 (no setting): the CPU stands in
#: for a GPU (4:4:4) with an encoding that asks for what it does.
ENCODING = datapack.Encoding(22, chroma="4:2:0")
#: What a pack prepared on a GPU stores: nvJPEG's encoder keeps chroma 4:4:4, the default.
CUDA_ENCODING = datapack.Encoding(22)
CUDA = torch.cuda.is_available()


@pytest.fixture
def mixed(tmp_path) -> Path:
    """Every kind of file a folder may hold: what the device decodes (baseline, progressive,
    grey, small enough to keep), what it leaves to Pillow (PNG, CMYK), and what nobody
    decodes (not a JPEG at all; a JPEG cut short, whose header still reads)."""
    return mixed_folder(tmp_path / "mixed", every_kind=True)


def _pack_dir(folder: Path) -> Path:
    return folder.parent / f"{folder.name}{datapack.PACK_SUFFIX}"


def _error_kind(error: str) -> str:
    return error.split(" <")[0]  # Pillow names the BytesIO it read, at its address


def _plain(result: Prepared) -> Prepared:
    return replace(result, error=result.error and _error_kind(result.error))


def _build(folder: Path, device: str | None, tmp_path: Path, name: str,
           encoding: datapack.Encoding = ENCODING):
    """The pack built on `device`, fetched and checked (every shard and sample against the
    index's sha256s) like a worker's copy; the pack beside the folder is removed after."""
    index, place, built = datapack.pack_folder(folder, encoding=encoding, device=device)
    assert built
    local = tmp_path / name
    datapack.fetch_shards(index, place, local, tmp_path / f"{name}-scratch")
    files = datapack.PackedFiles(index, local)
    stored = {rel: files.read(rel) for rel in index.files}
    files.close()
    shutil.rmtree(place.path)
    return index, stored


def test_torchvision_on_the_cpu_stores_what_pillow_stores_and_the_pack_verifies(mixed,
                                                                                tmp_path):
    pillow, _ = _build(mixed, None, tmp_path, "pillow")
    index, stored = _build(mixed, "cpu", tmp_path, "device")
    assert index.prepared["encoder"].startswith("torchvision ")
    assert index.prepared["encoder"].endswith(" on cpu")
    assert pillow.prepared["encoder"].startswith("Pillow ")
    dims = {rel: (f["width"], f["height"]) for rel, f in index.files.items()}
    assert dims == {rel: (f["width"], f["height"]) for rel, f in pillow.files.items()}
    assert dims["a/tall.jpg"] == (22, 33) and dims["a/small.jpg"] == (20, 16)
    assert set(index.skipped) == set(pillow.skipped) == {"a/broken.jpg", "a/cut.jpg"}
    for rel, skipped in index.skipped.items():  # the same error line as Pillow's build
        assert _error_kind(skipped["error"]) == _error_kind(pillow.skipped[rel]["error"])
    for rel, data in stored.items():
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "JPEG" and not im.info.get("progressive")  # baseline
            assert im.size == dims[rel]
    assert stored["a/small.jpg"] == (mixed / "a" / "small.jpg").read_bytes()  # kept as it was


def test_what_the_device_cannot_take_goes_through_pillow_alone(mixed, monkeypatch):
    from torchvision.io import encode_jpeg

    def refusing_tall(images, quality):  # as nvJPEG fails a whole batch for one image
        if any(image.shape[1] > image.shape[2] for image in images):
            raise RuntimeError("nvjpegEncodeImage failed")
        return encode_jpeg(images, quality=quality)

    monkeypatch.setattr(gpuencode, "BATCH", 3)  # several batches, tall.jpg's with others
    rels = sorted(p.relative_to(mixed).as_posix() for p in mixed.rglob("*") if p.is_file())
    encoder = DeviceEncoder(ENCODING, "cpu", encode=refusing_tall)
    results = list(encoder.prepare((rel, (mixed / rel).read_bytes()) for rel in rels))
    assert [r.rel for r in results] == rels  # in order, across batches
    assert sorted(encoder.by_pillow) == ["a/broken.jpg", "a/cmyk.jpg", "a/cut.jpg",
                                         "a/grey.jpg", "a/tall.jpg", "a/wide.png"]
    for r in results:
        if r.rel in encoder.by_pillow:  # Pillow's result, to the byte, or its error
            assert _plain(r) == _plain(prepare_bytes(r.rel, (mixed / r.rel).read_bytes(),
                                                     ENCODING))
    cut = next(r for r in results if r.rel == "a/cut.jpg")
    assert cut.data is None and cut.error.startswith("OSError")


@pytest.mark.parametrize("wrong", ["garbage", "a black image"])
def test_an_encode_that_does_not_decode_back_to_the_image_is_never_stored(mixed, wrong):
    from torchvision.io import encode_jpeg

    def broken(images, quality):
        if wrong == "garbage":
            return [torch.frombuffer(bytearray(b"\xff\xd8\xff\xe0 cut"), dtype=torch.uint8)
                    for _ in images]
        return encode_jpeg([torch.zeros_like(image) for image in images], quality=quality)

    rels = ["a/big_progressive.jpg", "a/tall.jpg", "a/wide.png"]
    encoder = DeviceEncoder(ENCODING, "cpu", encode=broken)
    with capture_logs() as logs:
        results = list(encoder.prepare((rel, (mixed / rel).read_bytes()) for rel in rels))
    assert encoder.by_pillow == rels  # every one encoded by Pillow instead
    assert results == [prepare_bytes(rel, (mixed / rel).read_bytes(), ENCODING) for rel in rels]
    said = [e["event"] for e in logs if e["log_level"] == "warning"]
    assert len(said) == 2 and "does not decode back to the image" in said[0]


def test_a_pack_built_on_either_is_current_for_the_other_and_rebuilt_only_where_changed(
        mixed, tmp_path):
    old, place, _ = datapack.pack_folder(mixed, encoding=ENCODING)  # Pillow
    index, _, built = datapack.pack_folder(mixed, encoding=ENCODING, device="cpu")
    assert not built and index.prepared["encoder"].startswith("Pillow ")
    changed = mixed / "a" / "tall.jpg"
    stat = changed.stat()
    jpeg(changed, (60, 40), seed=9)
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5 * 10**9))
    index, place, built = datapack.pack_folder(mixed, encoding=ENCODING, device="cpu")
    assert built and index.prepared["encoder"].startswith("torchvision ")
    kept = set(old.files) - {"a/tall.jpg"}
    assert {rel: index.files[rel]["sha256"] for rel in kept} == \
        {rel: old.files[rel]["sha256"] for rel in kept}  # reused, not encoded again
    assert (index.files["a/tall.jpg"]["width"], index.files["a/tall.jpg"]["height"]) == (33, 22)


def test_the_worker_reads_a_device_built_pack_in_place(photo_cherries, tmp_path):
    folder = tmp_path / "drive" / "train"
    shutil.copytree(photo_cherries / "train", folder)
    side = stored_side(32, 0.5)
    encoding = datapack.Encoding(side, chroma="4:2:0")
    index, _, _ = datapack.pack_folder(folder, encoding=encoding, device="cpu",
                                       prepared_for={"image_size": 32, "min_crop_scale": 0.5})
    report = cache_folder(folder, tmp_path / "cache", wanted=Wanted(32, 0.5))
    assert report.way == "prepared" and report.pack == "current" and report.files == 48
    files = datapack.PackedFiles(index, Path(report.local))
    for rel in index.files:
        with Image.open(io.BytesIO(files.read(rel))) as im:
            assert im.convert("RGB").size == files.dims(rel) == (side, side)
    files.close()


def test_a_device_is_probed_with_one_tiny_image_both_ways():
    DeviceEncoder(ENCODING, "cpu").probe()
    with pytest.raises(RuntimeError, match="stores chroma 4:2:0, the pack 4:4:4"):
        DeviceEncoder(datapack.Encoding(22), "cpu").probe()  # a pack's default: 4:4:4

    def unavailable(images, quality):
        raise RuntimeError("Couldn't load the image extension")

    with pytest.raises(RuntimeError, match="image extension"):
        DeviceEncoder(ENCODING, "cpu", encode=unavailable).probe()


@pytest.mark.skipif(CUDA, reason="this machine has a CUDA GPU")
def test_the_device_is_cuda_only_where_there_is_one(mixed, capsys):
    assert datapack.pick_device("cpu") is None and datapack.pick_device("auto") is None
    with pytest.raises(datapack.PackError, match="no CUDA GPU.*--device cpu prepares with"):
        datapack.pick_device("cuda")
    assert main(["data", "pack", str(mixed), "--image-size", "16", "--device", "cuda",
                 "--no-progress"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert main(["data", "pack", str(mixed), "--device", "cpu", "--no-progress"]) == 2
    assert "give --image-size N too" in capsys.readouterr().err
    assert main(["data", "pack", str(mixed), "--image-size", "16", "--device", "auto",
                 "--no-progress"]) == 0
    assert "Pillow" in capsys.readouterr().out  # auto without a GPU: the process pool


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_a_pack_prepared_on_cuda_is_pillows_pack_by_nvjpeg(mixed, photo_cherries, tmp_path,
                                                            capsys):
    from torchvision.io import ImageReadMode, decode_jpeg

    assert datapack.pick_device("auto") == "cuda"
    for rel in sorted((photo_cherries / "train").rglob("*.jpg"))[:12]:  # a batch of real work
        shutil.copy(rel, mixed / "a" / f"photo-{rel.name}")
    pillow, pillow_stored = _build(mixed, None, tmp_path, "pillow", CUDA_ENCODING)
    index, stored = _build(mixed, "cuda", tmp_path, "cuda", CUDA_ENCODING)
    assert " on cuda (" in index.prepared["encoder"]
    assert {rel: (f["width"], f["height"]) for rel, f in index.files.items()} == \
        {rel: (f["width"], f["height"]) for rel, f in pillow.files.items()}
    assert set(index.skipped) == set(pillow.skipped) == {"a/broken.jpg", "a/cut.jpg"}
    for rel, data in stored.items():  # baseline JPEG that nvJPEG takes, near Pillow's pixels
        assert not Image.open(io.BytesIO(data)).info.get("progressive")
        if rel.startswith("a/photo-"):
            ours, theirs = (decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8),
                                        mode=ImageReadMode.RGB, device="cuda").float()
                            for d in (data, pillow_stored[rel]))
            assert (ours - theirs).abs().mean().item() < 8, rel
    assert main(["data", "pack", str(mixed), "--image-size", "16", "--device", "cuda",
                 "--no-progress"]) == 0
    assert " on cuda (" in capsys.readouterr().out
