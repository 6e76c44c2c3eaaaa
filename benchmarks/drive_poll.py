"""What an idle worker's poll costs on a Drive API root: a listing of queue/ against the
changes feed, and the worker's real poll before and after the poll cache.

The scene, on the fake Drive v3 (cherry_train/testing/fakedrive.py) through the real client:
a queue root with `--queued` jobs that busy workers hold (they rewrite a heartbeat every 30 s
and their status every 60 s, append metrics), plus `--other-writes` writes a minute elsewhere
in the user's Drive (Drive for Desktop syncing, other apps). An idle worker polls every 30 s for
`--minutes`. Per poll, it reports requests and response bytes of:

- `files.list` of queue/ (what cherry-train does: one request; fields limited to what is used);
- `changes.list` from a saved page token (also one request when little changed, but it returns
  every change in the whole Drive since the last poll, the busy workers' own writes included,
  and cannot tell a new manifest without each change's parents);
- the worker's poll as it is now (`Worker.run_once`, with the manifest and held-job cache), and
  as it was before (every manifest and every job's state read at each poll).

Then the worker's own idle loop on an empty root polling every `--poll-seconds` (the CLI's
`cherry worker --poll-seconds`): its requests in each idle minute after the first, by kind.

    python benchmarks/drive_poll.py [--queued 5] [--minutes 10] [--other-writes 20]
                                    [--poll-seconds 2]
"""

from __future__ import annotations

import argparse
from collections import Counter
from datetime import timedelta

from cherry_train.jobqueue.claims import WorkerIdentity
from cherry_train.jobqueue.clock import FakeClock, age_seconds
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.schemas import Heartbeat, validate_config
from cherry_train.testing.fakedrive import FakeDrive
from cherry_train.testing.fakehttp import fake_drive_storage
from cherry_train.worker.loop import Worker, WorkerOptions

CONFIG = {"model": {"name": "resnet50", "num_classes": 2},
          "training": {"epochs": 30, "batch_size": 32, "learning_rate": 0.001},
          "data": {"train_path": "data/train", "val_path": "data/val"}}
POLL_SECONDS = 30


def measure(drive: FakeDrive, fn) -> tuple[int, int]:
    requests, sent = len(drive.requests), drive.response_bytes
    fn()
    return len(drive.requests) - requests, drive.response_bytes - sent


def world_second(t: int, busy, claims, other, other_writes: int) -> None:
    """What the busy workers and the rest of the Drive write in second `t`."""
    for i, claim in enumerate(claims):
        owner = busy.owner(claim)
        if t % 30 == i:
            hb = Heartbeat(job_id=claim.job_id, attempt=1, worker_id=f"busy-{i}",
                           at=busy.clock.now(), step=t)
            owner.write(claim.paths.heartbeat, hb.to_json())
            owner.write(claim.paths.metrics, b'{"step": %d}\n' % t)
        if t % 60 == i:
            busy.storage.write_atomic(f"workers/busy-{i}.json", b"{}")
    if other_writes and t % max(1, 60 // other_writes) == 0:
        other.write_atomic(f"sync/{t}.jpg", b"x" * 100)


def idle_minutes(poll_seconds: float, minutes: int) -> None:
    """The idle worker loop itself (Worker.run) on an empty root, on a driven clock: each
    minute's polls and requests, by what they were for."""
    drive, clock = FakeDrive(), FakeClock()
    queue = JobQueue(fake_drive_storage(drive), clock)
    queue.storage.write_atomic("queue/.keep", b"")  # an existing, empty queue
    queue_folder = queue.storage._folder_id("queue", create=False)
    start, marks, wait = clock.now(), [], clock.wait

    def counted_wait(stop, seconds):
        marks.append((age_seconds(clock, start), len(drive.requests)))
        return wait(stop, seconds)

    clock.wait = counted_wait
    Worker(queue, WorkerIdentity("idle"),
           WorkerOptions(poll_max_seconds=poll_seconds, idle_shutdown_minutes=minutes + 2,
                         release_runtime=lambda: None)).run()

    def kind(method: str, path: str) -> str:
        if method != "GET":
            return "writes (the worker's status file)"
        if queue_folder in path and "name+%3D" not in path:
            return "listings of queue/"
        return "look-ups (sweeps/ for trials to make)" if "sweeps" in path else "other"

    print(f"\nthe idle worker loop, --poll-seconds {poll_seconds:g}, an empty root:")
    for minute in range(1, minutes + 1):
        inside = [(t, n) for t, n in marks if minute * 60 <= t < (minute + 1) * 60]
        end = next(n for t, n in marks if t >= (minute + 1) * 60)
        kinds = Counter(kind(m, p) for m, p in drive.requests[inside[0][1]:end])
        print(f"minute {minute + 1}: {len(inside)} polls, {end - inside[0][1]} requests ("
              + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + ")")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queued", type=int, default=5)
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--other-writes", type=int, default=20, help="per minute, elsewhere")
    parser.add_argument("--poll-seconds", type=float, default=2.0,
                        help="the idle loop's longest wait between polls")
    args = parser.parse_args()

    drive, clock = FakeDrive(), FakeClock()
    busy = JobQueue(fake_drive_storage(drive), clock)
    claims = []
    for i in range(args.queued):
        manifest = busy.submit(validate_config({**CONFIG, "name": f"job-{i}"}))
        claims.append(busy.try_claim(manifest, WorkerIdentity(f"busy-{i}")))
    other = fake_drive_storage(drive, folder="photos")

    idle_queue = JobQueue(fake_drive_storage(drive), clock)
    worker = Worker(idle_queue, WorkerIdentity("idle"))
    lister = fake_drive_storage(drive)
    queue_folder = lister._folder_id("queue", create=False)
    feed = lister.service.changes()
    token = feed.getStartPageToken().execute()["startPageToken"]

    def list_queue():
        if queue_folder is not None:
            lister._children(queue_folder)

    def changes():
        nonlocal token
        page_token = token
        while page_token:
            page = feed.list(pageToken=page_token, pageSize=1000, spaces="drive",
                             fields="nextPageToken,newStartPageToken,"
                                    "changes(fileId,removed,file(name,parents,modifiedTime))"
                             ).execute()
            page_token = page.get("nextPageToken")
            token = page.get("newStartPageToken", token)

    def old_poll():  # before the cache: every manifest, and each job's state, at every poll
        fresh = JobQueue(fake_drive_storage(drive), clock)
        manifests, _ = fresh.poll.queued()
        for m in manifests:
            fresh.try_claim(m, WorkerIdentity("idle-old"))

    worker.run_once()  # the first look reads everything once
    totals = {k: [0, 0] for k in ("files.list of queue/", "changes.list",
                                  "worker poll (now)", "worker poll (before)")}
    polls = args.minutes * 60 // POLL_SECONDS
    for n in range(polls):
        for second in range(POLL_SECONDS):  # the rest of the world, second by second
            clock.advance(1)
            world_second(n * POLL_SECONDS + second, busy, claims, other, args.other_writes)
        for name, fn in (("files.list of queue/", list_queue), ("changes.list", changes),
                         ("worker poll (now)", worker.run_once),
                         ("worker poll (before)", old_poll)):
            requests, sent = measure(drive, fn)
            totals[name][0] += requests
            totals[name][1] += sent
    print(f"{args.queued} jobs held by live workers, {args.other_writes} other writes a minute, "
          f"{polls} polls every {POLL_SECONDS} s ({timedelta(minutes=args.minutes)})")
    print(f"{'per poll':<24}{'requests':>10}{'response bytes':>16}")
    for name, (requests, sent) in totals.items():
        print(f"{name:<24}{requests / polls:>10.2f}{sent / polls:>16,.0f}")
    idle_minutes(args.poll_seconds, 3)


if __name__ == "__main__":
    main()
