"""A queue root that is a plain folder: the Colab Drive mount, Drive for Desktop, or any dir."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from stat import S_ISDIR

from cherry_train import files
from cherry_train.files import is_temp, temp_beside, write_synced
from cherry_train.storage.base import FileInfo, Storage


def _holds(target: Path, data: bytes) -> bool:
    """Whether an existing file is exactly ours: a repeated create (after an I/O error hid its
    success) must not look like a lost race. Records are unique (ids, times), so no one else's
    file can hold the same bytes."""
    try:
        return target.read_bytes() == data
    except OSError:
        return False


class LocalStorage(Storage):
    def __init__(self, root: Path | str):
        self.root = Path(root).expanduser().absolute()
        self.description = f"local folder {self.root}"

    def _path(self, path: str) -> Path:
        full = Path(os.path.normpath(self.root / path))
        if full != self.root and self.root not in full.parents:
            raise ValueError(f"path {path!r} leaves the queue root")
        return full

    @contextmanager
    def _staged(self, path: str) -> Iterator[tuple[Path, Path]]:
        """The target (its folder created) and a temp name beside it, removed afterwards."""
        target = self._path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_beside(target)
        try:
            yield target, tmp
        finally:
            tmp.unlink(missing_ok=True)

    def local_path(self, path: str) -> Path:
        return self._path(path)

    def free_bytes(self) -> int | None:
        """The disk's free space (on Colab's Drive mount, what the mount reports)."""
        try:
            return shutil.disk_usage(self.root).free
        except OSError:
            return None

    def read_bytes(self, path: str) -> bytes:
        return self._path(path).read_bytes()

    def read_range(self, path: str, offset: int, length: int) -> bytes:
        with open(self._path(path), "rb") as f:
            f.seek(offset)
            return f.read(length)

    def write_atomic(self, path: str, data: bytes) -> None:
        files.write_atomic(self._path(path), data)

    def create_exclusive(self, path: str, data: bytes) -> bool:
        with self._staged(path) as (target, tmp):
            write_synced(tmp, data)
            try:
                # link() publishes the complete file under the final name, or fails if the name
                # is taken: exclusive and never half-written, on every POSIX file system.
                os.link(tmp, target)
                return True
            except FileExistsError:
                return _holds(target, data)
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                return self._create_exclusive_without_links(target, data)

    @staticmethod
    def _create_exclusive_without_links(target: Path, data: bytes) -> bool:
        # File systems without hard links (some FUSE mounts): O_EXCL is still exclusive, but a
        # reader may briefly see a short file; readers treat an unparsable record as "not yet".
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return _holds(target, data)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True

    def list_dir(self, path: str) -> list[str]:
        try:
            names = os.listdir(self._path(path))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(n for n in names if not is_temp(n))

    def remove_temps(self, path: str) -> int:
        removed = 0
        for folder, _, names in os.walk(self._path(path)):  # links are not followed
            for name in filter(is_temp, names):
                Path(folder, name).unlink(missing_ok=True)
                removed += 1
        return removed

    def stat(self, path: str) -> FileInfo | None:
        try:
            st = self._path(path).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return FileInfo(size=st.st_size,
                        modified=datetime.fromtimestamp(st.st_mtime, tz=timezone.utc),
                        is_dir=S_ISDIR(st.st_mode))

    def move(self, src: str, dst: str) -> None:
        target = self._path(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._path(src), target)

    def delete(self, path: str) -> None:
        target = self._path(path)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)

    def upload(self, local: Path, path: str) -> None:
        with files.replacing(self._path(path)) as tmp:
            try:
                os.link(local, tmp)  # same file system: no copy needed
            except OSError:
                shutil.copyfile(local, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())

    def download(self, path: str, local: Path) -> None:
        with files.replacing(Path(local)) as tmp:
            shutil.copyfile(self._path(path), tmp)
