"""Data packs: a folder packed into a few shards beside it, unpacked by workers, verified,
rebuilt when the folder changes, never trusted over the folder itself."""

from __future__ import annotations

import json
import os
import shutil

import pytest

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


def test_plan_shards_keeps_path_order_and_size():
    files = {f"c/{i:03d}.jpg": 400 for i in range(10)}
    shards = datapack.plan_shards(files, shard_bytes=3000)  # 2 files of 400 + 1024 each
    assert [rel for s in shards for rel in s] == sorted(files)
    assert [len(s) for s in shards] == [2] * 5
    assert datapack.plan_shards({"big.jpg": 10_000}, shard_bytes=3000) == [["big.jpg"]]
