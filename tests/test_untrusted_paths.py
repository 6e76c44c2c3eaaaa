"""Paths and names read from the queue folder (anyone who can write a shared Drive folder wrote
them) never lead a write out of its folder on this machine, and data folders are read without
following symbolic links: fetch, the TensorBoard copy, the data cache and its packs, pre-flight."""

from __future__ import annotations

import io
import json
import shutil
from datetime import datetime, timezone

import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from cherry_train import datapack
from cherry_train.cli import main
from cherry_train.client.submit import _class_images, _download_sample
from cherry_train.jobqueue.ids import JOB_ID_RE, new_job_id, slug
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.jobqueue.views import all_job_ids
from cherry_train.safepaths import UnsafePath, inside, plain_name, walk_files
from cherry_train.schemas import ConfigError, Manifest, TrialRecord, validate_config
from cherry_train.storage import LocalStorage
from cherry_train.testing.fakedrive import FakeDrive
from cherry_train.testing.fakehttp import fake_drive_storage
from cherry_train.worker.errors import JobError
from cherry_train.worker.inputs.datacache import cache_folder
from cherry_train.worker.inputs.prepare import local_file
from cherry_train.worker.inputs.sources import Source, StorageSource

JOB = "20261126-101500-evil-7f3a"
NOW = datetime(2026, 11, 26, 10, 15, tzinfo=timezone.utc)
UNSAFE = ["../../evil.sh", "/tmp/cherry-evil-absolute.sh", "a//evil.sh", "./evil.sh",
          "sub/../../evil.sh", "..", "", "a\\..\\evil.sh"]


@pytest.mark.parametrize("rel", UNSAFE)
def test_a_path_from_the_queue_must_stay_inside_its_folder(tmp_path, rel):
    with pytest.raises(UnsafePath) as e:
        inside(tmp_path, rel, "done/x/result.json")
    assert repr(rel) in str(e.value) and "done/x/result.json" in str(e.value)
    assert inside(tmp_path, "checkpoints/step-000000006.pt", "r") == \
        tmp_path / "checkpoints" / "step-000000006.pt"
    for name in ("a/b", "..", ""):
        with pytest.raises(UnsafePath, match="not a plain file name"):
            plain_name(name, "a Drive listing")


@pytest.mark.parametrize("rel", ["../../evil.sh", "/tmp/cherry-evil-absolute.sh", "a//b.pt"])
def test_fetch_refuses_a_result_naming_a_path_outside_dest_and_writes_nothing(tmp_path, capsys,
                                                                             rel):
    """A result.json (written by whoever can write the folder) listing `../../evil.sh` once
    wrote two levels above DIR/<job_id>/: now the whole fetch is refused, in one line."""
    root = tmp_path / "root"
    storage = LocalStorage(root)
    storage.write_atomic(f"done/{JOB}/best.pt", b"weights")
    storage.write_atomic(f"done/{JOB}/evil", b"#!/bin/sh\necho owned\n")
    artifacts = {"best_weights": {"path": "best.pt", "bytes": 7, "sha256": "0" * 64},
                 "x": {"path": rel, "bytes": 22, "sha256": "0" * 64}}
    storage.write_atomic(f"done/{JOB}/result.json", json.dumps(
        {"job_id": JOB, "state": "succeeded", "attempts": 1, "finished_at": NOW.isoformat(),
         "artifacts": artifacts}).encode())
    dest = tmp_path / "home" / "me" / "out"
    assert main(["fetch", JOB, "--root", str(root), "--dest", str(dest)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and repr(rel) in err and "nothing was fetched" in err
    assert not dest.exists()  # not even result.json: nothing half-done
    assert not list(tmp_path.rglob("evil.sh")) and not (tmp_path / "home" / "me" / "a").exists()
    assert not __import__("os").path.exists("/tmp/cherry-evil-absolute.sh")


def test_every_id_the_project_makes_fits_the_id_pattern_and_a_path_does_not():
    names = ["resnet50-baseline", "lr-sweep-t12", "x" * 64, "Ünïcode name!", "sweep",
             "a" * 40 + "-t9999"]
    ids = [new_job_id(n, NOW) for n in names]
    ids += ["sweep-" + i for i in ids]
    assert all(JOB_ID_RE.fullmatch(i) for i in ids), ids
    assert slug("...") == "job"  # never empty
    cfg = validate_config({"name": "tiny", "model": {"name": "resnet18", "num_classes": 2},
                           "training": {"epochs": 1, "batch_size": 2, "learning_rate": 0.1},
                           "data": {"train_path": "t", "val_path": "v"}})
    for good in ids:
        Manifest(job_id=good, name="n", submitted_at=NOW, config=cfg)
    for bad in ("../../x", "a/b", "", ".hidden", "x\n", "/abs"):
        with pytest.raises(ValidationError, match="job_id"):
            Manifest(job_id=bad, name="n", submitted_at=NOW, config=cfg)
        with pytest.raises(ValidationError, match="job_id"):
            TrialRecord(sweep_id="s", n=1, job_id=bad, params={}, created_at=NOW)


def test_the_tensorboard_copy_skips_names_that_would_leave_it(tmp_path):
    """An API root's event files are copied under their Drive names: a name with '/' or '..'
    (Drive allows both), in a job folder or as a job, is skipped with one line."""
    from cherry_train.client.boards import synced_logdir

    drive = FakeDrive()
    queue = JobQueue(fake_drive_storage(drive))
    queue.storage.write_atomic("done/job-a/tensorboard/events.out.1", b"good")
    queue.storage.write_atomic("done/job-a/tensorboard/evil1", b"evil")
    queue.storage.write_atomic("done/job-a/tensorboard/evil2", b"evil")
    queue.storage.write_atomic("done/job-z/tensorboard/evil3", b"evil")
    drive.find("traina/done/job-a/tensorboard/evil1")[0].name = "../../../evil1"
    drive.find("traina/done/job-a/tensorboard/evil2")[0].name = "sub/../../evil2"
    drive.find("traina/done/job-z")[0].name = "../.."  # a "job" whose id is a path
    copy = tmp_path / "a" / "b" / "copy"
    with capture_logs() as logs:
        synced_logdir(queue, copy)
    assert (copy / "job-a" / "tensorboard" / "events.out.1").read_bytes() == b"good"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["events.out.1"]
    said = [e["event"] for e in logs if e["log_level"] == "warning"]
    assert len(said) == 2 and "'../../../evil1'" in said[0] and "'sub/../../evil2'" in said[1]
    assert all_job_ids(queue) == ["job-a"]  # '../..' is no job: `cherry fetch` never sees it


def test_the_cache_refuses_a_listing_that_leaves_it_before_copying_anything(tmp_path):
    """Whatever the source (a folder, Drive, a new backend), every listed path is checked to
    stay inside the cache before the first file is written."""
    class Listed(Source):
        name = label = "listed"

        def exists(self):
            return True

        def listing(self):
            return {"good/1.jpg": (4, 0), "good/../../../escaped.jpg": (4, 0)}

        def copy(self, rel, target, size):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"evil")
            return "0" * 64

    with pytest.raises(JobError, match="data: listed: the path 'good/../../../escaped.jpg'"):
        cache_folder(Listed(), tmp_path / "cache", pack="off")
    assert not list(tmp_path.rglob("*.jpg"))


@pytest.mark.parametrize("name", ["a/../../escaped.jpg", "sub/escaped.jpg"])
def test_data_from_drive_with_a_name_that_is_a_path_fails_the_job_before_copying(tmp_path,
                                                                                  name):
    """(Names starting with '.', '..' among them, are hidden files: never listed.)"""
    drive = FakeDrive()
    storage = fake_drive_storage(drive)
    storage.write_atomic("data/train/good/1.jpg", b"jpeg")
    storage.write_atomic("data/train/good/2.jpg", b"evil")
    drive.find("traina/data/train/good/2.jpg")[0].name = name
    cache = tmp_path / "deep" / "er" / "cache"
    with pytest.raises(JobError, match=f"data: .*{name!r}"):
        cache_folder(StorageSource(storage, "data/train"), cache)
    assert not list(tmp_path.rglob("*.jpg"))


def test_preflight_refuses_drive_names_that_are_paths_and_writes_nothing(tmp_path):
    storage = fake_drive_storage(FakeDrive())
    for counts in ({"good": ["../../evil.jpg"]}, {"../..": ["x.jpg"]}, {"a/b": []}):
        with pytest.raises(ConfigError, match="not a plain file name"):
            _download_sample(storage, "data/train", counts, tmp_path / "sample" / "train")
    assert not list(tmp_path.rglob("*"))


def test_a_weights_file_named_dot_dot_stays_out_of_scratch(tmp_path):
    class Storage:
        description = "gdrive folder traina"

        def download(self, path, local):
            local.write_bytes(b"w")

    with pytest.raises(JobError, match="model.pretrained: the path '..'"):
        local_file("weights/..", "model.pretrained", None, Storage(), tmp_path / "scratch")
    assert not list(tmp_path.rglob("*"))


# -- symbolic links in a data folder ---------------------------------------------------------

@pytest.fixture
def linked(tmp_path, cherry_images):
    """A data folder holding a link to a secret outside it, and a link to a folder outside."""
    src = tmp_path / "drive" / "train"
    shutil.copytree(cherry_images / "train", src)
    secret = tmp_path / "home" / ".ssh" / "id_ed25519"
    secret.parent.mkdir(parents=True)
    secret.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY----- very secret")
    (src / "good" / "a-link.jpg").symlink_to(secret)
    (src / "defect" / "elsewhere").symlink_to(secret.parent, target_is_directory=True)
    return src, secret


def test_links_in_a_data_folder_are_skipped_said_once_and_never_packed(tmp_path, linked):
    """A link to a file outside the folder was copied into the cache and packed into a 0644
    shard beside the data. Now every link (file or folder) is skipped, and one line says how
    many and names the first."""
    src, secret = linked
    assert walk_files(src).links == ["defect/elsewhere", "good/a-link.jpg"]
    with capture_logs() as logs:
        report = cache_folder(src, tmp_path / "cache", pack="on")
    assert report.files == 96 and report.pack == "built"
    said = [e for e in logs if e["log_level"] == "warning"]
    assert len(said) == 1 and said[0]["links"] == 2 and said[0]["first"] == "defect/elsewhere"
    assert "2 symbolic links skipped" in said[0]["event"]
    copied = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert all(p.read_bytes() != secret.read_bytes() for p in copied)
    shards = (src.parent / f"train{datapack.PACK_SUFFIX}").glob("shard-*.tar")
    assert all(secret.read_bytes() not in s.read_bytes() for s in shards)
    index = json.loads((src.parent / f"train{datapack.PACK_SUFFIX}" / "index.json").read_text())
    assert not [rel for rel in index["files"] if "link" in rel or "elsewhere" in rel]


def test_preflight_sees_the_data_as_the_worker_does_and_says_links_were_skipped(linked):
    src, _ = linked
    links: list[str] = []
    images = _class_images(src, links)
    assert {c: len(v) for c, v in images.items()} == {"defect": 48, "good": 48}
    assert links == ["defect/elsewhere", "good/a-link.jpg"]


def test_data_read_in_place_lists_no_link_and_keeps_torchvisions_order(tmp_path, linked):
    """With `data.cache: false` the folder is read where it is: a link there must not be read
    either. The order is make_dataset's (crop boxes are drawn by sample index)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    from cherry_train.worker.inputs.samples import folder_samples

    src, secret = linked
    listed = folder_samples(src, ["defect", "good"])
    assert len(listed) == 96 and not [p for p, _ in listed if "link" in p or "elsewhere" in p]
    plain = tmp_path / "plain"
    shutil.copytree(src, plain, ignore=shutil.ignore_patterns("a-link.jpg", "elsewhere"))
    (plain / "good" / "sub").mkdir()  # a subfolder sorts by folder first, as make_dataset does
    shutil.copy(next((plain / "good").glob("*.jpg")), plain / "good" / "sub")
    assert folder_samples(plain, ["defect", "good"]) == \
        make_dataset(str(plain), {"defect": 0, "good": 1}, extensions=IMG_EXTENSIONS)


@pytest.mark.parametrize(("rel", "shard"), [("good/1.jpg", "../../../evil.tar"),
                                            ("../../escaped.jpg", "shard-1.tar")])
def test_a_pack_index_naming_paths_out_of_the_cache_is_not_used(tmp_path, rel, shard):
    """A pack's index is data beside the data folder: a shard it names is downloaded into
    scratch under that name, and each file is written under its path. Both must be plain."""
    opened = []

    class Place(datapack.PackPlace):
        description = "gdrive folder traina: data/train.cherry-pack"

        def open(self, name, scratch):
            opened.append(name)
            return io.BytesIO(b"\0" * 512 + b"evil")

    index = datapack.PackIndex(source="s", shards={shard: {"bytes": 4, "files": 1}},
                               files={rel: {"size": 4, "mtime_ns": 0, "sha256": "0" * 64,
                                            "shard": shard, "offset": 512}})
    target = tmp_path / "cache" / "entry" / "files"
    with pytest.raises(datapack.PackError, match=repr(rel if ".." in rel else shard)):
        datapack.unpack(index, Place(), [rel], target, tmp_path / "cache" / "entry" / "unpack")
    assert opened == ([] if ".." in shard else [shard])
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
