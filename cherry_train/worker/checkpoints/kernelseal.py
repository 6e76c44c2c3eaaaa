"""Stored compiled kernels, signed by the workers that compiled them.

Compiled kernels are code the worker runs, and they are kept in the job folder, which anyone who
can write the queue folder can replace. So they are stored only with an HMAC-SHA256 made with a
key the workers hold outside the queue folder ($CHERRY_KERNEL_KEY, a key file), over the job id
and the bytes (whose header names the torch, Triton, GPU and batch they were compiled for); a
worker loads them only once the MAC matches, before anything parses them. Without a key, kernels
are neither stored nor loaded; a finished job's are removed before its result is committed.
Torch-free: the CLI checks the key before the worker starts.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

import structlog

from cherry_train import places
from cherry_train.jobqueue.owner import Fenced, Owner

log = structlog.get_logger(__name__)

KEY_ENV = "CHERRY_KERNEL_KEY"
KEY_FILE = "kernel-key"  # in the config folder (`places.config_dir()`)
#: A key shorter than this is refused: it could be guessed, and then forged MACs would verify.
MIN_KEY_CHARS = 32
MAKE_KEY = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
#: What a resumed attempt pays without stored kernels (docs/benchmarks.md, "Compiling on a
#: resumed attempt"): said once per worker, where it matters.
RESUME_COST = ("about 50 s for ResNet-50 at batch 256 on an H100, against 4 s from stored "
               "kernels")

_MAGIC = b"cherry-train signed kernels v1\n"
_DOMAIN = b"cherry-train compiled kernels v1\x00"  # a MAC for this use only
_TAG_CHARS = 64  # hex of SHA-256


class KernelKeyError(ValueError):
    """A key that cannot be used (a user error: one line, exit 2)."""


class Unverified(Exception):
    """Stored kernels whose MAC does not verify: never to be loaded."""


@dataclass
class KernelSeal:
    """The workers' key for stored kernels, or None (kernels off) and why."""

    key: bytes | None
    why_off: str = "no kernel key"
    _told: bool = False  # the once-per-worker note that kernels are off

    @property
    def enabled(self) -> bool:
        return self.key is not None

    def sign(self, blob: bytes, job_id: str) -> bytes:
        """The bytes to store for `job_id`: a header with the MAC, then the blob."""
        return _MAGIC + self._mac(blob, job_id) + b"\n" + blob

    def verify(self, data: bytes, job_id: str) -> bytes:
        """The blob `sign` stored for this job; Unverified if the MAC does not match (another
        key, another job, or a byte changed). Nothing in `data` is parsed before this."""
        if self.key is None:
            raise Unverified(self.why_off)
        start = len(_MAGIC) + _TAG_CHARS + 1
        if not data.startswith(_MAGIC) or data[start - 1:start] != b"\n":
            raise Unverified("not signed")
        blob = data[start:]
        if not hmac.compare_digest(data[len(_MAGIC):start - 1], self._mac(blob, job_id)):
            raise Unverified("the MAC does not match (another key, another job, or changed)")
        return blob

    def tell_off(self) -> None:
        """Say once per worker that a compiled job's kernels are not kept, what that costs a
        resumed attempt, and how to keep them."""
        if self._told:
            return
        self._told = True
        log.info(f"compiled kernels are not stored ({self.why_off}): an attempt resumed on a "
                 f"fresh VM compiles again ({RESUME_COST}). To store them, give every worker of "
                 f"this queue root the same key: ${KEY_ENV} or --kernel-key-file (README, "
                 "'Compiled kernels survive a disconnect')")

    def _mac(self, blob: bytes, job_id: str) -> bytes:
        assert self.key is not None
        mac = hmac.new(self.key, _DOMAIN, hashlib.sha256)
        name = job_id.encode()
        mac.update(len(name).to_bytes(4, "big") + name)  # length first: no two splits alike
        mac.update(blob)
        return mac.hexdigest().encode()


def load_seal(key_file: str | None, queue_folder: Path | None) -> KernelSeal:
    """The worker's key: --kernel-key-file, else $CHERRY_KERNEL_KEY, else the config folder's
    `kernel-key` file, else none (kernels off). CHERRY_STORED_KERNELS=0 turns them off even with
    a key. A key file inside the queue folder is refused: whoever can write the folder could
    read the key there."""
    if os.environ.get("CHERRY_STORED_KERNELS", "").strip().lower() in ("0", "off", "false", "no"):
        return KernelSeal(None, "CHERRY_STORED_KERNELS=0")
    default = places.config_dir() / KEY_FILE
    if key_file is not None:
        path, where = Path(key_file).expanduser(), f"--kernel-key-file {key_file}"
    elif os.environ.get(KEY_ENV, "").strip():
        return KernelSeal(_checked(os.environ[KEY_ENV], f"${KEY_ENV}"))
    elif default.is_file():
        path, where = default, str(default)
    else:
        return KernelSeal(None)
    if queue_folder is not None and path.resolve().is_relative_to(queue_folder.resolve()):
        raise KernelKeyError(f"{where}: the key is inside the queue folder, where whoever can "
                             "write the folder can read it; keep it outside")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise KernelKeyError(f"{where}: cannot read the key ({type(e).__name__}: {e})") from None
    return KernelSeal(_checked(text, where))


def forget_compiled_kernels(owner: Owner) -> None:
    """Compiled kernels are kept for resumed attempts only; a finished job has none."""
    try:
        owner.delete(owner.claim.paths.compiled_kernels)  # fenced, like every write of the job
    except Fenced:
        raise
    except Exception as e:  # tens of MB left behind, nothing worse: the result still counts
        log.warning("could not remove the compiled kernels", error=f"{type(e).__name__}: {e}")


def _checked(text: str, where: str) -> bytes:
    key = text.strip()
    if len(key) < MIN_KEY_CHARS:
        raise KernelKeyError(f"{where}: the kernel key has {len(key)} characters; use at least "
                             f"{MIN_KEY_CHARS} random ones, e.g. from {MAKE_KEY}")
    return key.encode()
