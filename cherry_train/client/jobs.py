"""Finding jobs by what people type: a full id, its unique end (`7f3a`), or a glob of
experiment names or ids (`resnet50-lr-*`)."""

from __future__ import annotations

import fnmatch

from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.jobqueue.views import all_job_ids, job_view


class NoSuchJob(ValueError):
    pass


#: A job's id ends in 4 random hex digits: fewer characters than that match by accident (`b`
#: cancelled a job because it happened to be the only id ending in b).
MIN_SHORT_ID = 4


def find_job(queue: JobQueue, text: str) -> str:
    ids = all_job_ids(queue)
    if text in ids:
        return text
    if len(text) < MIN_SHORT_ID:
        raise NoSuchJob(f"JOB: {text!r} is too short to name a job safely; give at least "
                        f"{MIN_SHORT_ID} characters of its id (its end, e.g. 7f3a, or its "
                        "start), or the whole id")
    matches = [i for i in ids if i.endswith(text) or i.startswith(text)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise NoSuchJob(f"JOB: no job {text!r} under {queue.storage.description}; "
                        "`cherry status` lists them")
    raise NoSuchJob(f"JOB: {text!r} matches {len(matches)} jobs ({', '.join(matches[:4])}"
                    f"{', ...' if len(matches) > 4 else ''}); give more of the id")


def find_jobs(queue: JobQueue, patterns: list[str]) -> list[str]:
    """Jobs for each pattern, in the order given; a glob matches names and ids."""
    found: list[str] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            hits = [j for j in all_job_ids(queue)
                    if fnmatch.fnmatch(j, pattern) or fnmatch.fnmatch(_name(queue, j), pattern)]
            if not hits:
                raise NoSuchJob(f"JOB: nothing matches {pattern!r}")
            found += sorted(hits)
        else:
            found.append(find_job(queue, pattern))
    return list(dict.fromkeys(found))


def _name(queue: JobQueue, job_id: str) -> str:
    view = job_view(queue, job_id)
    return view.manifest.name if view.manifest else ""
