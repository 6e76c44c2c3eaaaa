"""Digests of files, streamed (checkpoints and weights are hundreds of MB): sha256 for our own
records, md5 to compare with what Google Drive reports (its md5Checksum)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def _file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    return _file_digest(path, "sha256")


def file_md5(path: Path) -> str:
    return _file_digest(path, "md5")
