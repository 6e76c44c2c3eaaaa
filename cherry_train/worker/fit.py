"""Which queued jobs this worker can run: a job whose `requires:` its device does not meet is
passed over before the claim, so it never gets an attempt here (nor counts one)."""

from __future__ import annotations

import structlog

from cherry_train.schemas import Manifest
from cherry_train.schemas.requires import Capabilities

log = structlog.get_logger(__name__)


class Fit:
    def __init__(self, has: Capabilities | None):
        self.has = has  # None: not measured (a test's worker): every job fits
        self._told: set[str] = set()  # jobs already said to be passed over: once each

    def can_run(self, manifest: Manifest) -> bool:
        if self.has is None:
            return True
        unmet = manifest.config.requires.unmet(self.has)
        if unmet and manifest.job_id not in self._told:
            self._told.add(manifest.job_id)
            log.info("passing over a job this worker cannot run", job_id=manifest.job_id,
                     needs=", ".join(unmet), has=self.has.describe())
        return not unmet
