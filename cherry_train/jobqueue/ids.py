"""Job ids: sortable by submission time, safe as file names, carrying the experiment name."""

from __future__ import annotations

import re
import secrets
from datetime import datetime

from cherry_train.schemas.config import ID_PATTERN

WORKER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: What a job or sweep id may be (the manifest checks it too): a plain file name.
JOB_ID_RE = re.compile(ID_PATTERN)


def slug(name: str, limit: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:limit].strip("-")
    return s or "job"


def new_job_id(name: str, now: datetime) -> str:
    """e.g. 20261126-101500-resnet50-baseline-7f3a (UTC)."""
    return f"{now:%Y%m%d-%H%M%S}-{slug(name)}-{secrets.token_hex(2)}"
