"""Data packs: a folder packed into a few shards beside it, unpacked by workers, verified,
rebuilt when the folder changes, never trusted over the folder itself."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import pytest
from pictures import jpeg, mixed_folder

from cherry_train import datapack
from cherry_train.cli import main
from cherry_train.storage import LocalStorage
from cherry_train.worker.inputs.datacache import cache_folder
from cherry_train.worker.inputs.sources import StorageSource


@pytest.fixture
def source(tmp_path, cherry_images):
    src = tmp_path / "drive" / "train"
    shutil.copytree(cherry_images / "train", src)
    return src


def pack_dir(source):
    return source.parent / f"{source.name}{datapack.PACK_SUFFIX}"


def local_files(report):
    root = report.local
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(__import__("pathlib").Path(root).rglob("*")) if p.is_file()}


def test_cli_packs_a_folder_into_shards_and_says_what_it_costs(source, capsys):
    assert main(["data", "pack", str(source), "--shard-mb", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    index = json.loads((pack_dir(source) / datapack.INDEX).read_text())
    assert len(index["files"]) == 96
    shards = sorted(p.name for p in pack_dir(source).glob("shard-*.tar"))
    assert shards == sorted(index["shards"]) and len(shards) >= 1
    assert "packed 96 files" in out and "of Drive space" in out
    assert main(["data", "pack", str(source), "--no-progress"]) == 0
    assert "is current" in capsys.readouterr().out  # unchanged: nothing rebuilt


def test_cli_refuses_what_is_not_a_folder(tmp_path, capsys):
    assert main(["data", "pack", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_small_shards_split_the_folder(source, tmp_path):
    listing = datapack.list_folder(source)
    index = datapack.build_pack(source, listing, datapack.FolderPackPlace(pack_dir(source)),
                                tmp_path / "scratch", "src", shard_bytes=20_000)
    assert len(index.shards) > 3
    assert sum(s["files"] for s in index.shards.values()) == 96
    assert {f["shard"] for f in index.files.values()} == set(index.shards)


def test_a_worker_unpacks_instead_of_copying_and_gets_the_same_files(source, tmp_path):
    plain = cache_folder(source, tmp_path / "plain", pack="off")
    datapack.pack_folder(source, shard_bytes=30_000)
    packed = cache_folder(source, tmp_path / "packed")
    assert packed.unpacked_files == 96 and packed.copied_files == 96
    assert packed.pack == "current" and packed.sha256 == plain.sha256
    assert local_files(packed) == local_files(plain)
    again = cache_folder(source, tmp_path / "packed")
    assert again.copied_files == 0 and again.pack == "current"


def test_a_changed_folder_takes_what_still_matches_and_the_pack_is_rebuilt(source, tmp_path):
    datapack.pack_folder(source, shard_bytes=30_000)
    old_shards = set(os.listdir(pack_dir(source)))
    victim = sorted((source / "good").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[::-1])
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 5 * 10**9))
    (source / "defect" / "new.jpg").write_bytes(b"\xff\xd8 new image")
    report = cache_folder(source, tmp_path / "cache", pack="on")
    assert report.unpacked_files == 95 and report.copied_files == 97
    assert report.pack == "built"
    cached = tmp_path / "cache"
    assert next(cached.rglob(victim.name)).read_bytes() == victim.read_bytes()
    index = datapack.FolderPackPlace(pack_dir(source)).index()
    assert index.is_current(datapack.list_folder(source))
    assert set(os.listdir(pack_dir(source))) != old_shards  # the old shards went
    fresh = cache_folder(source, tmp_path / "fresh")
    assert fresh.unpacked_files == 97 and fresh.sha256 == report.sha256


def test_a_corrupt_shard_is_never_trusted(source, tmp_path):
    datapack.pack_folder(source, shard_bytes=30_000)
    shard = sorted(pack_dir(source).glob("shard-*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF  # inside the first file's bytes
    shard.write_bytes(bytes(data))
    plain = cache_folder(source, tmp_path / "plain", pack="off")
    report = cache_folder(source, tmp_path / "cache", pack="auto")
    assert report.unpacked_files == 0 and report.copied_files == 96
    assert local_files(report) == local_files(plain)


@pytest.mark.parametrize(("pack", "built"), [("auto", None), ("on", "built"), ("off", None)])
def test_who_builds_a_pack(source, tmp_path, pack, built):
    report = cache_folder(source, tmp_path / "cache", pack=pack)
    assert report.pack == built  # auto: 96 files are few enough to copy one by one
    assert pack_dir(source).exists() == (built is not None)


def test_a_pack_in_a_storage_root_is_used(tmp_path, cherry_images):
    root = tmp_path / "root"
    shutil.copytree(cherry_images, root / "data")
    datapack.pack_folder(root / "data" / "val", shard_bytes=30_000)
    report = cache_folder(StorageSource(LocalStorage(root), "data/val"), tmp_path / "cache")
    assert report.unpacked_files == 32 and report.pack == "current"
    plain = cache_folder(root / "data" / "val", tmp_path / "plain", pack="off")
    assert report.sha256 == plain.sha256


def test_shards_keep_path_order_and_size(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    for i in range(10):
        (folder / f"{i:03d}.bin").write_bytes(bytes([i]) * 400)
    index = datapack.build_pack(folder, datapack.list_folder(folder),
                                datapack.FolderPackPlace(tmp_path / "pack"), tmp_path / "scratch",
                                "c", shard_bytes=3000)  # 2 files of 400 + 1024 each
    by_shard = {}
    for rel in sorted(index.files):
        by_shard.setdefault(index.files[rel]["shard"], []).append(rel)
    assert sorted(by_shard.values()) == [[f"{2 * i:03d}.bin", f"{2 * i + 1:03d}.bin"]
                                         for i in range(5)]


# The reader: shards fetched whole and checked, samples read in place at their offsets.


def packed_index(source):
    datapack.pack_folder(source, shard_bytes=30_000)
    return datapack.FolderPackPlace(pack_dir(source)).load_index()


def test_the_index_records_where_each_sample_is_and_its_image_size(source):
    from PIL import Image

    index = packed_index(source)
    assert index.format == 2 and index.prepared is None and index.source_bytes == \
        sum(p.stat().st_size for p in source.rglob("*.jpg"))
    for rel, f in index.files.items():
        shard = (pack_dir(source) / f["shard"]).read_bytes()
        original = (source / rel).read_bytes()
        assert shard[f["offset"]:f["offset"] + f["length"]] == original
        assert f["sha256"] == hashlib.sha256(original).hexdigest()
        assert f["size"] == len(original) and f["mtime_ns"] == (source / rel).stat().st_mtime_ns
        assert (f["width"], f["height"]) == Image.open(source / rel).size


def test_fetch_shards_copies_and_checks_them_and_samples_read_in_place(source, tmp_path):
    index = packed_index(source)
    place = datapack.FolderPackPlace(pack_dir(source))
    progress = []
    local = tmp_path / "local"
    got = datapack.fetch_shards(index, place, local, tmp_path / "scratch", progress.append)
    assert sorted(got.fetched) == sorted(index.shards) and got.kept == [] and sum(progress) == 96
    assert sorted(os.listdir(local)) == sorted(index.shards)  # no temp names left
    files = datapack.PackedFiles(index, local)
    for rel in index.files:
        assert files.read(rel) == (source / rel).read_bytes()
        assert files.size(rel) == (source / rel).stat().st_size
    (local / "shard-0000stale.tar").write_bytes(b"old")
    (local / ".shard-x.tar.part").write_bytes(b"cut")
    again = datapack.fetch_shards(index, place, local, tmp_path / "scratch")
    assert again.fetched == [] and sorted(again.kept) == sorted(index.shards)
    assert sorted(os.listdir(local)) == sorted(index.shards)  # leftovers removed
    cut = local / sorted(index.shards)[0]
    cut.write_bytes(cut.read_bytes()[:-10])  # a shard of the wrong length is not read...
    in_cut = next(rel for rel, f in index.files.items() if f["shard"] == cut.name)
    with pytest.raises(datapack.PackError, match="not the length its index says"):
        datapack.PackedFiles(index, local).read(in_cut)
    # ...and fetched again
    assert datapack.fetch_shards(index, place, local, tmp_path / "scratch").fetched == [cut.name]
    assert files.read(sorted(index.files)[-1]) == (source / sorted(index.files)[-1]).read_bytes()
    files.close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend"])
def test_a_damaged_shard_is_refused_naming_it_and_what_to_do(source, tmp_path, damage):
    index = packed_index(source)
    shard = sorted(pack_dir(source).glob("shard-*.tar"))[0]
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[2000] ^= 0xFF  # inside the first sample's bytes
    elif damage == "truncate":
        del data[len(data) // 2:]
    else:
        data += b"\0" * 512
    shard.write_bytes(bytes(data))
    local = tmp_path / "local"
    with pytest.raises(datapack.PackError) as e:
        datapack.fetch_shards(index, datapack.FolderPackPlace(pack_dir(source)), local,
                              tmp_path / "scratch")
    assert shard.name in str(e.value) and f"cherry data pack {source}" in str(e.value)
    first = min((f["offset"], rel) for rel, f in index.files.items()
                if f["shard"] == shard.name)[1]
    assert {"flip": f"{first} does not match its sha256", "truncate": "cut short",
            "extend": "is longer than its index says"}[damage] in str(e.value)
    assert shard.name not in os.listdir(local)  # never under its name, never a .part left
    assert not [n for n in os.listdir(local) if n.endswith(".part")]


def _read_all(files, rels):
    return [files.read(rel) for rel in rels]


def test_packed_files_pickle_and_read_in_forked_processes(source, tmp_path):
    import multiprocessing
    import pickle

    index = packed_index(source)
    local = tmp_path / "local"
    datapack.fetch_shards(index, datapack.FolderPackPlace(pack_dir(source)), local, tmp_path)
    files = datapack.PackedFiles(index, local)
    rels = sorted(index.files)[:8]
    expected = _read_all(files, rels)  # opens descriptors in this process first
    assert files._fds
    copy = pickle.loads(pickle.dumps(files))
    assert copy._fds == {} and _read_all(copy, rels) == expected
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert pool.starmap(_read_all, [(files, rels)] * 2) == [expected] * 2
    assert _read_all(files, rels) == expected  # the parent's descriptors still work
    files.close()


def test_a_prepared_pack_serves_smaller_sizes_and_refuses_larger_in_words():
    from cherry_train.sizes import stored_side

    index = datapack.PackIndex(source="s", files={}, shards={},
                               prepared={"short_side": 256, "quality": 90})
    assert stored_side(160, 0.5) <= 256 < stored_side(224, 0.6) == 299
    assert index.serves(256) and not index.serves(257)
    assert index.refusal(160, 0.5, "data/train") is None
    assert index.refusal(224, 0.6, "data/train") == (
        "data pack of data/train was made for short side 256, data.image_size 224 "
        "(augmentation.min_crop_scale 0.6) needs 299: rebuild it with "
        "`cherry data pack data/train --image-size 224 --min-crop-scale 0.6`")
    assert "--image-size 224`" in index.refusal(224, 0.5, "d")  # the default scale unsaid
    verbatim = datapack.PackIndex(source="s", files={}, shards={})
    assert verbatim.serves(10_000) and verbatim.refusal(1024, 0.08, "d") is None


@pytest.mark.parametrize(("content", "says"), [
    (lambda raw: raw[: len(raw) // 2], "not JSON, truncated or damaged"),
    (lambda raw: raw.replace(b'"format": 2', b'"format": 1'), "pack format 1 (made by an older"),
    (lambda raw: re.sub(rb'"length": \d+', b'"length": 99999999', raw, count=1),
     "its bytes end past its shard's"),
])
def test_an_index_that_cannot_be_used_says_which_file_and_what_to_do(source, content, says):
    packed_index(source)
    path = pack_dir(source) / datapack.INDEX
    path.write_bytes(content(path.read_bytes()))
    place = datapack.FolderPackPlace(pack_dir(source))
    with pytest.raises(datapack.PackError) as e:
        place.load_index()
    assert str(e.value).startswith(f"{path}: ") and says in str(e.value)
    assert str(e.value).endswith(f"rebuild the pack with `cherry data pack {source}`")
    assert place.index() is None  # the worker's view: no pack, copy file by file


def test_a_worker_never_unpacks_a_prepared_pack_as_the_originals(source, tmp_path):
    datapack.pack_folder(source, shard_bytes=30_000, encoding=datapack.Encoding(24))
    plain = cache_folder(source, tmp_path / "plain", pack="off")
    report = cache_folder(source, tmp_path / "cache", pack="auto")
    assert report.unpacked_files == 0 and local_files(report) == local_files(plain)


# Prepared packs: every image re-encoded once at the short side training stores.


@pytest.fixture
def mixed(tmp_path):
    return mixed_folder(tmp_path / "mixed")


def test_a_prepared_pack_stores_each_image_once_at_the_short_side(mixed, tmp_path, capsys):
    import io

    from PIL import Image

    assert main(["data", "pack", str(mixed), "--image-size", "16", "--min-crop-scale", "1",
                 "--no-progress"]) == 0  # stored_side(16, 1.0) == 22
    out, err = capsys.readouterr()
    assert "prepared 4 images" in out and "→" in out and "×)" in out
    assert "left out 1 files that do not decode as images: a/broken.jpg" in err
    place = datapack.FolderPackPlace(pack_dir(mixed))
    index = place.load_index()
    assert index.prepared["short_side"] == 22 and index.prepared["quality"] == 90
    assert index.prepared["image_size"] == 16 and set(index.skipped) == {"a/broken.jpg"}
    local = tmp_path / "local"
    datapack.fetch_shards(index, place, local, tmp_path / "scratch")
    files = datapack.PackedFiles(index, local)
    sizes = {"a/wide.png": (29, 22), "a/tall.jpg": (22, 33), "a/small.jpg": (20, 16),
             "a/small_progressive.jpg": (20, 16)}  # aspect kept, never up-scaled
    for rel, size in sizes.items():
        img = Image.open(io.BytesIO(files.read(rel)))
        assert img.format == "JPEG" and not img.info.get("progressive")  # baseline
        assert img.size == size == files.dims(rel)
    assert files.read("a/small.jpg") == (mixed / "a" / "small.jpg").read_bytes()  # as it was
    assert index.is_current(datapack.list_folder(mixed))  # the broken file counts as seen
    assert main(["data", "pack", str(mixed), "--image-size", "16", "--min-crop-scale", "1",
                 "--no-progress"]) == 0
    assert "is current" in capsys.readouterr().out
    assert main(["data", "pack", str(mixed), "--image-size", "20", "--min-crop-scale", "1",
                 "--no-progress"]) == 0  # another image size: rebuilt for it
    assert place.load_index().prepared["short_side"] == 27
    assert main(["data", "pack", str(mixed), "--no-progress"]) == 0  # and back to verbatim
    assert place.load_index().prepared is None and "packed 5 files" in capsys.readouterr().out


def test_draft_mode_decodes_a_large_jpeg_at_reduced_scale(tmp_path, monkeypatch):
    from PIL import JpegImagePlugin

    from cherry_train.datapack.prepare import encode

    jpeg(tmp_path / "big.jpg", (400, 300))
    asked = []
    draft = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: asked.append(size) or draft(self, mode, size))
    data, width, height = encode((tmp_path / "big.jpg").read_bytes(), datapack.Encoding(60))
    assert asked == [(80, 60)] and (width, height) == (80, 60)


def test_prepared_images_keep_their_colour_at_full_resolution(mixed):
    """4:4:4, no chroma subsampling: at the small sides training stores, 4:2:0 cost the demo
    task at photo size 3 points of validation accuracy (docs/benchmarks.md). A pack from
    before the index said its chroma (so 4:2:0) is not current: `cherry data pack` rebuilds it."""
    import io

    from PIL import Image, JpegImagePlugin

    enc = datapack.Encoding(22)
    index, place, _ = datapack.pack_folder(mixed, encoding=enc)
    assert index.prepared["chroma"] == "4:4:4"
    files = datapack.PackedFiles(index, place.path)
    with Image.open(io.BytesIO(files.read("a/wide.png"))) as img:
        assert JpegImagePlugin.get_sampling(img) == 0  # 0: 4:4:4 (2 would be 4:2:0)
    files.close()
    raw = json.loads((place.path / datapack.INDEX).read_bytes())
    del raw["prepared"]["chroma"]
    (place.path / datapack.INDEX).write_text(json.dumps(raw))
    again, _, built = datapack.pack_folder(mixed, encoding=enc)
    assert built and again.prepared["chroma"] == "4:4:4"


def test_a_rebuild_reuses_unchanged_images_and_encodes_only_the_changed(mixed, tmp_path):
    import io

    from PIL import Image

    enc = datapack.Encoding(22)
    old, place, _ = datapack.pack_folder(mixed, encoding=enc)
    first = datapack.PackedFiles(old, place.path)
    kept_before = first.read("a/tall.jpg")
    same = mixed / "a" / "tall.jpg"  # new pixels, same size and mtime: taken as unchanged
    stat = same.stat()
    jpeg(same, (40, 60), seed=1)
    same.write_bytes(same.read_bytes()[:stat.st_size].ljust(stat.st_size, b"\0"))
    os.utime(same, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed = mixed / "a" / "wide.png"
    Image.new("RGB", (48, 64), (0, 0, 255)).save(changed)
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5 * 10**9))
    index, place, built = datapack.pack_folder(mixed, encoding=enc)
    files = datapack.PackedFiles(index, place.path)
    assert built and files.read("a/tall.jpg") == kept_before  # the old stored bytes
    assert Image.open(io.BytesIO(files.read("a/wide.png"))).size == (22, 29)  # re-encoded
    assert sorted(os.listdir(place.path)) == sorted([datapack.INDEX, *index.shards])
    first.close()
    files.close()


def test_a_damaged_old_pack_costs_an_encode_never_the_build(mixed, tmp_path):
    enc = datapack.Encoding(22)
    old, place, _ = datapack.pack_folder(mixed, encoding=enc)
    shard = place.path / next(iter(old.shards))
    data = bytearray(shard.read_bytes())
    f = old.files["a/tall.jpg"]
    data[f["offset"] + 100] ^= 0xFF
    shard.write_bytes(bytes(data))
    (mixed / "a" / "new.png").write_bytes((mixed / "a" / "wide.png").read_bytes())
    index, place, built = datapack.pack_folder(mixed, encoding=enc)
    assert built and index.files["a/tall.jpg"]["sha256"] == f["sha256"]  # encoded again
    local = tmp_path / "local"
    datapack.fetch_shards(index, place, local, tmp_path / "scratch")  # and it checks out
