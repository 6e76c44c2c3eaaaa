"""What an idle worker remembers between polls, so that a poll costs one listing of queue/ (one
request on Drive): the manifests already read, and the jobs a live owner holds, with when its
lease could run out at the earliest. Both are keyed by the manifest's listing entry, which
changes when an owner releases its job (lifecycle.JobQueue.release rewrites the manifest).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pydantic import ValidationError

from cherry_train.jobqueue import layout
from cherry_train.jobqueue.clock import age_seconds
from cherry_train.jobqueue.jobfiles import JobFiles
from cherry_train.jobqueue.workercontrol import drains_in
from cherry_train.schemas import Manifest
from cherry_train.schemas.errors import one_line


class Poll:
    def __init__(self, files: JobFiles):
        self.files = files
        self._manifests: dict[str, tuple[tuple, Manifest]] = {}
        self._held: dict[str, tuple[tuple | None, datetime, int]] = {}
        self.drains: set[str] = set()  # worker ids asked to drain, as of the last listing

    def queued(self) -> tuple[list[Manifest], list[tuple[str, Exception]]]:
        """Manifests in queue/, in the order workers take them (priority, then submission),
        and the entries that cannot be read or validated, with why. Manifests are written once,
        so one read each is enough: later polls only list the folder."""
        good, bad = [], []
        storage = self.files.storage
        entries = storage.list_entries(layout.QUEUE)
        self.drains = drains_in(entries)
        for name in list(self._manifests):
            if name not in entries:
                del self._manifests[name]
        for name, info in sorted(entries.items()):
            if not name.endswith(".json"):
                continue
            job_id, key = name[: -len(".json")], (info.size, info.modified)
            cached = self._manifests.get(name)
            if cached is not None and cached[0] == key:
                good.append(cached[1])
                continue
            try:
                manifest = Manifest.from_json(storage.read_bytes(f"{layout.QUEUE}/{name}"))
            except FileNotFoundError:
                continue  # taken and moved by someone else since the listing
            except ValidationError as e:
                bad.append((job_id, ValueError(one_line(e, Manifest, "not a valid manifest"))))
                continue
            except (ValueError, UnicodeDecodeError) as e:
                bad.append((job_id, e))
                continue
            if manifest.job_id != job_id:
                bad.append((job_id, ValueError(
                    f"manifest says job_id {manifest.job_id!r} but its file is {name!r}")))
                continue
            self._manifests[name] = (key, manifest)
            good.append(manifest)
        good.sort(key=lambda m: (-m.priority, m.submitted_at, m.job_id))
        return good, bad

    def held_elsewhere(self, job_id: str, lease_seconds: float) -> bool:
        """Whether a live owner still holds the job, as far as we can tell cheaply: until its
        lease could run out, from memory; then from its heartbeat alone (one read). Forgotten
        once the manifest's listing entry changes (an owner that releases its job rewrites it)."""
        held = self._held.pop(job_id, None)
        if held is None or held[0] != self._listing_key(job_id):
            return False
        _, until, attempt = held
        clock = self.files.clock
        if clock.now() >= until:
            hb = self.files.heartbeat(job_id)
            if hb is None or hb.attempt != attempt or hb.released:
                return False
            age = age_seconds(clock, hb.at)
            if age > lease_seconds:
                return False
            self.hold(job_id, attempt, lease_seconds - age)
            return True
        self._held[job_id] = held
        return True

    def hold(self, job_id: str, attempt: int, seconds_left: float) -> None:
        """Remember that attempt `attempt` holds the job for at least `seconds_left` more."""
        until = self.files.clock.now() + timedelta(seconds=seconds_left)
        self._held[job_id] = (self._listing_key(job_id), until, attempt)

    def _listing_key(self, job_id: str) -> tuple | None:
        cached = self._manifests.get(f"{job_id}.json")
        return cached[0] if cached else None
