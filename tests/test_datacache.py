"""The local data cache: copy, verify, reuse, refresh, archives, a flaky source."""

from __future__ import annotations

import errno
import os
import shutil
import tarfile
import zipfile

import pytest

from cherry_train.backoff import Backoff
from cherry_train.worker.errors import JobError
from cherry_train.worker.inputs import sources
from cherry_train.worker.inputs.datacache import cache_folder


@pytest.fixture
def source(tmp_path, cherry_images):
    src = tmp_path / "drive" / "train"
    shutil.copytree(cherry_images / "train", src)
    return src


def test_copy_then_reuse_without_reading_again(tmp_path, source):
    first = cache_folder(source, tmp_path / "cache")
    assert first.files == 96 and first.copied_files == 96 and first.bytes > 0
    local = first.local
    assert sorted(os.listdir(local)) == ["defect", "good"]
    assert len(list((tmp_path / "cache").rglob("*.jpg"))) == 96
    again = cache_folder(source, tmp_path / "cache")
    assert again.copied_files == 0 and again.sha256 == first.sha256 and again.local == local


def test_a_changed_file_is_detected_and_refreshed(tmp_path, source):
    first = cache_folder(source, tmp_path / "cache")
    victim = sorted((source / "good").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[::-1])  # same size, new content and mtime
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
    (source / "good" / "new.jpg").write_bytes(b"\xff\xd8 not really")
    (sorted((source / "defect").iterdir())[0]).unlink()
    second = cache_folder(source, tmp_path / "cache")
    assert second.copied_files == 2 and second.files == 96
    assert second.sha256 != first.sha256
    local = tmp_path / "cache"
    assert (next(local.rglob(victim.name))).read_bytes() == victim.read_bytes()
    assert len(list(local.rglob("*.jpg"))) == 96


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_an_archive_is_copied_as_one_file_and_extracted(tmp_path, cherry_images, kind):
    archive = tmp_path / f"cherries.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as z:
            for path in cherry_images.rglob("*.jpg"):
                z.write(path, path.relative_to(cherry_images).as_posix())
    else:
        with tarfile.open(archive, "w:gz") as t:
            t.add(cherry_images / "train", "train")
            t.add(cherry_images / "val", "val")
    report = cache_folder(archive, tmp_path / "cache")
    assert report.files == 1 and report.copied_files == 1
    assert sorted(os.listdir(os.path.join(report.local, "val"))) == ["defect", "good"]
    again = cache_folder(archive, tmp_path / "cache")
    assert again.copied_files == 0 and again.sha256 == report.sha256


def test_archive_members_cannot_escape_the_cache(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("../../escaped.txt", "x")
    with pytest.raises(JobError, match="outside the cache"):
        cache_folder(archive, tmp_path / "cache")
    assert not (tmp_path / "escaped.txt").exists()


def test_transient_errors_while_copying_are_retried(tmp_path, source, monkeypatch):
    monkeypatch.setattr(sources, "COPY_BACKOFF", Backoff(first=0, tries=5))
    real_copy = sources._copy_file
    failed = []

    def flaky_copy(src, dst):
        if len(failed) < 10 and len(failed) % 2 == 0:
            failed.append(src)
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")
        failed.append(None)
        return real_copy(src, dst)

    monkeypatch.setattr(sources, "_copy_file", flaky_copy)
    report = cache_folder(source, tmp_path / "cache")
    assert report.files == 96 and sum(f is not None for f in failed) == 5


def test_missing_source_is_a_clear_job_error(tmp_path):
    with pytest.raises(JobError, match="does not exist"):
        cache_folder(tmp_path / "nope", tmp_path / "cache")
