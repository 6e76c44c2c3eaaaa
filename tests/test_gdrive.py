"""The Drive API backend beyond the shared contract: Drive's own semantics (duplicate names,
pagination, ids, resumable uploads), retries, lost responses, exclusive create over the API,
the queue protocol on it (two workers racing, a whole queue under 30% faults), the cost of an
idle poll, and credentials. Everything goes through the real google-api-python-client against
the stateful fake Drive v3 (cherry_train/testing/fakedrive.py)."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from concurrently import at_once

from cherry_train.jobqueue.claims import WorkerIdentity
from cherry_train.jobqueue.clock import FakeClock
from cherry_train.jobqueue.layout import JobPaths
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.jobqueue.views import all_job_ids, job_view
from cherry_train.schemas import JobState, Result, validate_config
from cherry_train.storage import gdrive
from cherry_train.storage.gdrive import DriveStorage
from cherry_train.storage.gdrive_api import DriveAuthError, DriveError, DriveFull
from cherry_train.testing.fakedrive import FOLDER, FakeDrive
from cherry_train.testing.fakehttp import FakeHttp, fake_drive_storage
from cherry_train.worker.loop import Worker


@pytest.fixture
def drive() -> FakeDrive:
    return FakeDrive()


def no_duplicates(drive: FakeDrive) -> None:
    """No folder holds two entries of one name: nothing was ever duplicated."""
    names = Counter((p, f.name) for f in drive.files.values() if f.id != "root"
                    for p in f.parents)
    dupes = [k for k, n in names.items() if n > 1]
    assert dupes == [], f"duplicated: {dupes}"


# -- Drive semantics -----------------------------------------------------------------------------

def test_the_earliest_of_duplicate_names_is_the_file(drive):
    storage = fake_drive_storage(drive)
    storage.write_atomic("queue/x.json", b"first")
    folder = drive.find("traina/queue")[0]
    # Someone (Drive for Desktop, a person) adds a second file of the same name.
    drive._create({"name": "x.json", "parents": [folder.id]}, b"second", {})
    assert storage.list_dir("queue") == ["x.json"]
    assert storage.read_bytes("queue/x.json") == b"first"
    storage.write_atomic("queue/x.json", b"third")
    assert [f.content for f in drive.find("traina/queue/x.json")] == [b"third", b"second"]
    storage.move("queue/x.json", "done/x.json")  # the move replaces whatever was at the target
    assert storage.read_bytes("done/x.json") == b"third"


def test_listings_follow_every_page(drive):
    drive.page_size_cap = 3
    storage = fake_drive_storage(drive)
    for i in range(10):
        storage.write_atomic(f"queue/{i:02d}.json", b"{}")
    assert storage.list_dir("queue") == [f"{i:02d}.json" for i in range(10)]
    assert drive.count("GET", "/drive/v3/files?") > 4  # it took several pages


def test_every_query_excludes_trashed_files(drive):
    storage = fake_drive_storage(drive)
    storage.write_atomic("queue/a.json", b"{}")
    drive.find("traina/queue/a.json")[0].trashed = True
    assert storage.list_dir("queue") == []
    assert not storage.exists("queue/a.json")
    from urllib.parse import parse_qs, urlsplit

    queries = [parse_qs(urlsplit(p).query).get("q", [""])[0] for m, p in drive.requests
               if m == "GET" and urlsplit(p).path == "/drive/v3/files"]
    assert queries and all("trashed = false" in q for q in queries)


def test_large_files_go_resumably_in_chunks_and_are_checked(drive, tmp_path, monkeypatch):
    monkeypatch.setattr(gdrive, "SIMPLE_UPLOAD_LIMIT", 1000)
    storage = fake_drive_storage(drive, chunk_bytes=256 * 1024)
    src = tmp_path / "ckpt.pt"
    src.write_bytes(bytes(range(256)) * 5000)  # 1.28 MB: 5 chunks
    storage.upload(src, "done/j/checkpoints/step-000000001.pt")
    assert drive.count("PUT") == 5
    assert drive.find("traina/done/j/checkpoints/step-000000001.pt")[0].content == \
        src.read_bytes()
    storage.download("done/j/checkpoints/step-000000001.pt", tmp_path / "back.pt")
    assert (tmp_path / "back.pt").read_bytes() == src.read_bytes()


def test_an_interrupted_resumable_upload_goes_on_where_drive_stopped(drive, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setattr(gdrive, "SIMPLE_UPLOAD_LIMIT", 1000)
    storage = fake_drive_storage(drive, fault_rate=0.4, seed=3)
    src = tmp_path / "ckpt.pt"
    src.write_bytes(bytes(range(256)) * 8000)
    storage.upload(src, "done/j/checkpoints/step-000000001.pt")
    (stored,) = drive.find("traina/done/j/checkpoints/step-000000001.pt")
    assert stored.content == src.read_bytes()
    # Drive was asked how far it got ("bytes */N") instead of resending everything.
    assert drive.count("PUT") >= 8


# -- retries and lost responses ------------------------------------------------------------------

class Scripted(FakeHttp):
    """Answers the first requests from a script: a status, or 'drop' (act, then lose the
    response); then behaves."""

    def __init__(self, drive, script):
        super().__init__(drive)
        self.script = list(script)

    def request(self, uri, method="GET", body=None, headers=None, **kw):
        import httplib2

        if self.script and not uri.split("?")[0].endswith("generateIds"):
            step = self.script.pop(0)
            if step == "drop":
                super().request(uri, method, body, headers, **kw)
                raise ConnectionResetError("dropped")
            return httplib2.Response({"status": step}), \
                b'{"error": {"code": %d, "errors": [{"reason": "%s"}]}}' % (
                    step, b"userRateLimitExceeded" if step == 403 else b"backendError")
        return super().request(uri, method, body, headers, **kw)


def scripted_storage(drive, script, waits):
    http = Scripted(drive, [])
    storage = DriveStorage("traina", lambda: http, sleep=waits.append)
    storage.write_atomic("queue/.keep", b"")  # folders exist: the script hits the next op
    http.script = list(script)
    return storage


def test_a_create_whose_response_was_lost_is_not_repeated(drive):
    waits = []
    storage = scripted_storage(drive, ["drop", "drop"], waits)
    assert storage.create_exclusive("queue/a.json", b"mine") is True
    assert [f.content for f in drive.find("traina/queue/a.json")] == [b"mine"]
    assert len(waits) >= 2  # retried, after waiting
    storage = scripted_storage(FakeDrive(), ["drop"], waits)
    storage.write_atomic("queue/b.json", b"x")
    assert len(storage.list_dir("queue")) == 2


@pytest.mark.parametrize("status", [429, 500, 503, 403])
def test_rate_limits_and_server_errors_are_retried_with_back_off(drive, status):
    waits = []
    storage = scripted_storage(drive, [status, status, status], waits)
    storage.write_atomic("queue/a.json", b"x")
    assert storage.read_bytes("queue/a.json") == b"x"
    assert len(waits) == 3 and waits[2] > waits[0]  # exponential (with jitter)


def test_other_client_errors_are_not_retried(drive):
    waits = []
    storage = scripted_storage(drive, [400], waits)
    from googleapiclient.errors import HttpError

    with pytest.raises(HttpError):
        storage.write_atomic("queue/a.json", b"x")
    assert waits == []
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("queue/missing.json")


def test_exhausted_retries_give_a_clear_error(drive):
    storage = scripted_storage(drive, [503] * 50, [])
    with pytest.raises(DriveError, match=r"write queue/a.json|create queue/a.json|list"):
        storage.write_atomic("queue/a.json", b"x")


def test_refused_credentials_are_one_clear_line(drive):
    storage = DriveStorage("traina", lambda: FakeHttp(drive, token="stale"), sleep=lambda s: 0)
    drive.token = "good"
    with pytest.raises(DriveAuthError, match="cherry drive login"):
        storage.list_dir("queue")


# -- exclusive create over the API ---------------------------------------------------------------

@pytest.mark.parametrize("reserved", [True, False], ids=["reserved-id", "create-and-read-back"])
@pytest.mark.parametrize("fault_rate", [0.0, 0.3])
def test_machines_racing_to_create_one_file_have_one_winner(drive, reserved, fault_rate):
    seeds = itertools.count()
    machines = [fake_drive_storage(drive, fault_rate=fault_rate, seed=next(seeds) * 100)
                for _ in range(6)]
    machines[0].write_atomic("done/j/attempts/.keep", b"")
    if reserved:
        (file_id,) = machines[0].reserve_ids(1)
        for m in machines:
            m.use_ids({"done/j/attempts/1.json": file_id})
    wins = []

    def claim(i, _):
        if machines[i].create_exclusive("done/j/attempts/1.json", f"worker {i}".encode()):
            wins.append(i)

    at_once(len(machines), claim)
    assert len(wins) == 1
    assert [f.content for f in drive.find("traina/done/j/attempts/1.json")] == \
        [f"worker {wins[0]}".encode()]


# -- the queue protocol over the API -------------------------------------------------------------

def config(tiny_config, **overrides):
    return validate_config({**tiny_config, **overrides})


def test_submit_reserves_ids_and_claims_use_them(drive, tiny_config):
    queue = JobQueue(fake_drive_storage(drive), FakeClock())
    manifest = queue.submit(config(tiny_config))
    paths = JobPaths(manifest.job_id)
    assert set(manifest.reserved_ids) == {paths.dir, paths.attempts_dir, paths.checkpoints_dir,
                                          paths.attempt(1), paths.result, paths.cancel_request}
    worker = JobQueue(fake_drive_storage(drive), FakeClock())  # another machine
    (seen,), _ = worker.poll.queued()
    claim = worker.try_claim(seen, WorkerIdentity("w1"))
    assert claim is not None and claim.attempt.next_id
    (attempt,) = drive.find(f"traina/{paths.attempt(1)}")
    assert attempt.id == manifest.reserved_ids[paths.attempt(1)]
    assert drive.find(f"traina/{paths.dir}")[0].id == manifest.reserved_ids[paths.dir]


def test_two_workers_racing_for_one_job_over_the_api(drive, tiny_config):
    from test_queue import fake_trainer

    JobQueue(fake_drive_storage(drive), FakeClock()).submit(config(tiny_config))
    ran = []

    def look(i):  # both workers have seen the job before either claims it
        queue = JobQueue(fake_drive_storage(drive, fault_rate=0.3, seed=i), FakeClock())
        return queue, Worker(queue, WorkerIdentity(f"w{i}"), trainer=fake_trainer(ran)), \
            queue.poll.queued()[0][0]

    def claim(i, seen):
        queue, worker, manifest = seen
        claimed = queue.try_claim(manifest, worker.me)
        if claimed is not None:
            worker.execute(claimed)

    at_once(2, claim, prepare=look)
    assert len(ran) == 1
    queue = JobQueue(fake_drive_storage(drive), FakeClock())
    (job_id,) = all_job_ids(queue)
    assert job_view(queue, job_id).state == JobState.succeeded
    assert len(drive.find(f"traina/done/{job_id}/attempts/1.json")) == 1
    no_duplicates(drive)


def test_a_whole_queue_under_30_percent_faults_loses_nothing(drive, tiny_config):
    from test_queue import fake_trainer

    client = JobQueue(fake_drive_storage(drive, fault_rate=0.3, seed=99), FakeClock())
    submitted = {client.submit(config(tiny_config, name=f"job-{i}")).job_id for i in range(8)}
    ran = []

    def work(i, _):
        queue = JobQueue(fake_drive_storage(drive, fault_rate=0.3, seed=1000 * i), FakeClock())
        worker = Worker(queue, WorkerIdentity(f"w{i}"), trainer=fake_trainer(ran))
        while worker.run_once():
            pass

    at_once(3, work)
    assert sorted(ran) == sorted(submitted)  # each job trained once
    queue = JobQueue(fake_drive_storage(drive), FakeClock())
    assert set(all_job_ids(queue)) == submitted
    assert {job_view(queue, j).state for j in submitted} == {JobState.succeeded}
    assert queue.storage.list_dir("queue") == []
    no_duplicates(drive)


def test_an_idle_poll_is_one_request(drive, tiny_config):
    """A job held by a live worker elsewhere, another worker polling: after its first look,
    each poll is one listing of queue/ until the holder's lease could have run out."""
    clock = FakeClock()
    owner_queue = JobQueue(fake_drive_storage(drive), clock)
    manifest = owner_queue.submit(config(tiny_config, lease_seconds=300))
    claim = owner_queue.try_claim(manifest, WorkerIdentity("busy"))
    assert claim is not None
    idle = JobQueue(fake_drive_storage(drive), clock)
    worker = Worker(idle, WorkerIdentity("idle"))
    assert worker.run_once() is False  # reads the manifest and the job's state once
    counts = []
    for _ in range(5):
        clock.advance(30)
        before = len(drive.requests)
        assert worker.run_once() is False
        counts.append(len(drive.requests) - before)
    assert counts == [1, 1, 1, 1, 1]
    from cherry_train.schemas import Heartbeat

    hb = Heartbeat(job_id=claim.job_id, attempt=1, worker_id="busy", at=clock.now())
    owner_queue.owner(claim).write(claim.paths.heartbeat, hb.to_json())
    clock.advance(200)  # the lease could have run out by now: its heartbeat alone is read
    before = len(drive.requests)
    assert worker.run_once() is False
    assert len(drive.requests) - before == 3  # list queue/, find heartbeat.json, read it
    clock.advance(400)  # and now it has: the job is looked at in full (and taken over)
    taken = []
    worker.execute = taken.append
    assert worker.run_once() is True and taken[0].attempt.reason == "lease-expired"


def test_an_unknown_folder_id_is_a_root_that_does_not_exist(drive, capsys, monkeypatch):
    storage = fake_drive_storage(drive, folder="id:no-such-id")
    assert storage.stat("") is None  # 404 on the root itself: no KeyError, no traceback


def test_a_tls_verification_failure_is_one_clear_error_at_once(drive):
    import ssl

    from cherry_train.storage import is_outage

    class BadTLS(FakeHttp):
        def request(self, *args, **kwargs):
            raise ssl.SSLCertVerificationError(
                1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed "
                   "certificate in certificate chain")

    waits = []
    storage = DriveStorage("traina", lambda: BadTLS(drive), sleep=waits.append)
    with pytest.raises(DriveError, match="TLS certificate cannot be verified") as info:
        storage.list_dir("queue")
    assert waits == []  # not retried: it fails the same way every time
    assert not is_outage(info.value)  # a worker left running says so, rather than wait on it
    assert "HTTPLIB2_CA_CERTS" in str(info.value)


def test_an_idle_worker_makes_one_request_per_poll_and_a_status_a_minute(drive):
    """Ten idle minutes of the worker loop itself (not one run_once): each poll lists queue/,
    and the worker's status file is written once a minute, not at every poll."""
    from cherry_train.worker.loop import WorkerOptions

    clock = FakeClock()
    queue = JobQueue(fake_drive_storage(drive), clock)
    queue.storage.write_atomic("queue/.keep", b"")  # an existing, empty queue
    polls = []
    wait = clock.wait

    def counted_wait(stop, seconds):
        polls.append((seconds, len(drive.requests)))
        return wait(stop, seconds)

    clock.wait = counted_wait
    worker = Worker(queue, WorkerIdentity("idle"),
                    WorkerOptions(idle_shutdown_minutes=10, release_runtime=lambda: None))
    start = len(drive.requests)
    assert worker.run() == 0
    steady = [(polls[i + 1][1] - polls[i][1]) for i in range(len(polls) - 1)
              if polls[i][0] == 30]  # requests of each 30 s poll, start-up back-off left out
    assert len(steady) >= 15
    status_writes = sum(1 for n in steady if n > 1)
    assert sum(steady) <= len(steady) + 3 * status_writes
    assert 7 <= status_writes <= 11, steady  # about one a minute over ~9.5 minutes of 30 s polls
    assert len(drive.requests) - start < 3 * len(polls) + 20


def test_an_idle_minute_with_short_polls_costs_its_polls_and_two_requests(drive):
    """`--poll-seconds 2`: 46 requests a minute for 31 polls, the status file rewritten every
    4 s (issue 25, item 11). Each idle minute after the first: a listing of queue/ per poll,
    plus at most the status file and the look for sweeps short of trials."""
    from cherry_train.jobqueue.clock import age_seconds
    from cherry_train.worker.loop import WorkerOptions

    clock = FakeClock()
    queue = JobQueue(fake_drive_storage(drive), clock)
    queue.storage.write_atomic("queue/.keep", b"")  # an existing, empty queue
    start, marks, wait = clock.now(), [], clock.wait

    def counted_wait(stop, seconds):  # when each poll ended, and the requests so far
        marks.append((age_seconds(clock, start), len(drive.requests)))
        return wait(stop, seconds)

    clock.wait = counted_wait
    worker = Worker(queue, WorkerIdentity("idle"),
                    WorkerOptions(poll_max_seconds=2, idle_shutdown_minutes=4,
                                  release_runtime=lambda: None))
    assert worker.run() == 0
    for minute in (1, 2):
        inside = [(t, n) for t, n in marks if minute * 60 <= t < (minute + 1) * 60]
        after = next(n for t, n in marks if t >= (minute + 1) * 60)
        polls, requests = len(inside), after - inside[0][1]
        assert polls >= 29, inside
        assert requests <= polls + 2, (minute, polls, requests)


def test_a_released_job_is_noticed_at_the_next_poll(drive, tiny_config):
    clock = FakeClock()
    owner_queue = JobQueue(fake_drive_storage(drive), clock)
    manifest = owner_queue.submit(config(tiny_config, lease_seconds=300))
    claim = owner_queue.try_claim(manifest, WorkerIdentity("busy"))
    idle = JobQueue(fake_drive_storage(drive), clock)
    manifests, _ = idle.poll.queued()
    assert idle.try_claim(manifests[0], WorkerIdentity("idle")) is None
    from cherry_train.schemas import Heartbeat

    hb = Heartbeat(job_id=claim.job_id, attempt=1, worker_id="busy", at=clock.now(),
                   released=True)
    owner_queue.release(owner_queue.owner(claim), hb)
    clock.advance(1)
    manifests, _ = idle.poll.queued()
    taken = idle.try_claim(manifests[0], WorkerIdentity("idle"))
    assert taken is not None and taken.attempt.reason == "released"


def test_cancel_uses_the_reserved_id(drive, tiny_config):
    queue = JobQueue(fake_drive_storage(drive), FakeClock())
    manifest = queue.submit(config(tiny_config))
    client = JobQueue(fake_drive_storage(drive), FakeClock())
    assert client.request_cancel(manifest.job_id) is True
    assert client.request_cancel(manifest.job_id) is False
    path = JobPaths(manifest.job_id).cancel_request
    (request,) = drive.find(f"traina/{path}")
    assert request.id == manifest.reserved_ids[path]


def test_folders_made_by_two_machines_at_once_end_up_one(drive):
    machines = [fake_drive_storage(drive, seed=i) for i in range(4)]
    at_once(4, lambda i, _: machines[i].write_atomic(f"workers/w{i}.json", b"{}"))
    folders = [f for f in drive.find("traina/workers") if f.mime_type == FOLDER]
    assert len(folders) == 1
    assert fake_drive_storage(drive).list_dir("workers") == [f"w{i}.json" for i in range(4)]


# -- credentials ---------------------------------------------------------------------------------

def test_the_saved_token_is_readable_by_its_owner_only(tmp_path):
    from cherry_train.storage.gdrive_auth import save_token, token_path

    path = save_token('{"token": "t"}')
    assert path == token_path() and path.stat().st_mode & 0o777 == 0o600
    path.chmod(0o644)
    save_token('{"token": "u"}')  # rewritten: the permissions are tightened again
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_saved_token_that_cannot_be_used_is_one_clear_line():
    from cherry_train.storage.gdrive_auth import credentials, save_token

    save_token('{"token": "old", "client_id": "c", "client_secret": "s"}')  # no refresh token
    with pytest.raises(DriveAuthError, match="is unreadable .* run `cherry drive login"):
        credentials()
    save_token('{"token": "old", "refresh_token": "r", "client_id": "c", "client_secret": "s", '
               '"token_uri": "http://127.0.0.1:9/token", "expiry": "2020-01-01T00:00:00Z"}')
    with pytest.raises(DriveAuthError, match="needs a refresh, and Google's token service is "
                       "unreachable"):
        credentials()


def test_no_credentials_at_all_says_what_to_do():
    from cherry_train.storage.gdrive_auth import credentials

    with pytest.raises(DriveAuthError, match="no Drive credentials on this machine"):
        credentials()


def test_login_refuses_a_client_that_is_not_a_desktop_app(tmp_path):
    from cherry_train.storage.gdrive_auth import login

    secrets = tmp_path / "client_secret.json"
    secrets.write_text('{"web": {"client_id": "x"}}')
    with pytest.raises(DriveAuthError, match="not a 'Desktop app' OAuth client"):
        login(secrets, open_browser=False)
    with pytest.raises(DriveAuthError, match="client secrets"):
        login(tmp_path / "missing.json", open_browser=False)


def test_an_access_token_from_the_environment_is_used_as_is(monkeypatch):
    from cherry_train.storage.gdrive_auth import credentials

    monkeypatch.setenv("CHERRY_DRIVE_TOKEN", "abc")
    assert credentials().token == "abc"


def test_a_folder_deleted_by_another_machine_is_resolved_again(drive):
    mine, theirs = fake_drive_storage(drive), fake_drive_storage(drive, seed=5)
    mine.write_atomic("done/j/heartbeat.json", b"1")
    theirs.delete("done/j")  # my cached folder id is stale now
    mine.write_atomic("done/j/heartbeat.json", b"2")
    mine.create_exclusive("done/j/result.json", b"r")
    assert theirs.read_bytes("done/j/heartbeat.json") == b"2"
    assert theirs.read_bytes("done/j/result.json") == b"r"


# -- data in Drive ---------------------------------------------------------------------------------

def test_data_paths_on_an_api_root_are_fetched_through_the_api(drive, tmp_path, monkeypatch,
                                                               cherry_images):
    from cherry_train.places import remote_location
    from cherry_train.worker.inputs.datacache import cache_folder

    queue_root = fake_drive_storage(drive)  # gdrive:traina
    my_drive = queue_root.sibling("")
    for path in sorted((cherry_images / "val").rglob("*.*"))[:6]:
        rel = path.relative_to(cherry_images / "val").as_posix()
        queue_root.upload(path, f"data/val/{rel}")  # below the queue folder
        my_drive.upload(path, f"datasets/cherries/val/{rel}")  # elsewhere in My Drive
    # Relative: below the queue folder. A Colab path, with no mount and no Drive for Desktop
    # here: the same path under My Drive. A local root, or a My Drive folder here: the files.
    where, path = remote_location("data/val", None, queue_root)
    assert where is queue_root and path == "data/val"
    where, path = remote_location("/content/drive/MyDrive/datasets/cherries/val", None,
                                  queue_root)
    assert where.folder == "" and path == "datasets/cherries/val"
    assert remote_location("data/val", tmp_path, queue_root) is None
    monkeypatch.setenv("CHERRY_MYDRIVE", str(tmp_path))
    assert remote_location("/content/drive/MyDrive/datasets/cherries/val", None,
                           queue_root) is None
    monkeypatch.delenv("CHERRY_MYDRIVE")

    from cherry_train.worker.inputs.sources import StorageSource

    reports = [cache_folder(StorageSource(where, path), tmp_path / "cache")
               for where, path in (remote_location("data/val", None, queue_root),
                                   remote_location("/content/drive/MyDrive/datasets/cherries/val",
                                                   None, queue_root))]
    assert [r.files for r in reports] == [6, 6] and reports[0].sha256 == reports[1].sha256
    again = cache_folder(StorageSource(queue_root, "data/val"), tmp_path / "cache")
    assert again.copied_files == 0  # unchanged in Drive: the local copy is reused


def test_a_download_that_does_not_match_drives_md5_is_refused(drive, tmp_path):
    class Corrupting(FakeHttp):
        def request(self, uri, method="GET", body=None, headers=None, **kw):
            resp, content = super().request(uri, method, body, headers, **kw)
            if "alt=media" in uri and content:
                content = bytes([content[0] ^ 0xFF]) + content[1:]  # one bit flipped in transit
            return resp, content

    fake_drive_storage(drive).write_atomic("done/j/best.pt", b"weights" * 100)
    storage = DriveStorage("traina", lambda: Corrupting(drive), sleep=lambda s: None)
    with pytest.raises(DriveError, match="does not match its md5"):
        storage.download("done/j/best.pt", tmp_path / "best.pt")
    assert not (tmp_path / "best.pt").exists()


def test_a_full_drive_is_one_clear_error_and_not_retried(tmp_path):
    drive = FakeDrive(quota_bytes=300_000)
    storage = fake_drive_storage(drive)
    storage.write_atomic("queue/a.json", b"x" * 1000)
    big = tmp_path / "step-000000006.pt"
    big.write_bytes(b"w" * 400_000)
    uploads = drive.count("POST", "/upload/")
    with pytest.raises(DriveFull, match=r"the Drive's storage is full "
                                               r"\(storageQuotaExceeded\); free space in it"):
        storage.upload(big, "done/job/checkpoints/step-000000006.pt")
    assert drive.count("POST", "/upload/") - uploads == 1  # a full Drive is not retried
    assert not storage.exists("done/job/checkpoints/step-000000006.pt")
    assert storage.read_bytes("queue/a.json") == b"x" * 1000  # what was there is untouched


def test_free_bytes_is_the_quota_less_what_is_stored():
    drive = FakeDrive(quota_bytes=300_000)
    storage = fake_drive_storage(drive)
    assert storage.free_bytes() == 300_000
    storage.write_atomic("queue/a.json", b"x" * 1000)
    assert storage.free_bytes() == 299_000
    assert fake_drive_storage(FakeDrive()).free_bytes() is None  # no limit: unknown


def test_a_retried_job_commits_again_through_new_reserved_ids(drive, tiny_config):
    """On the API root, result.json and the cancel request are created with ids reserved in the
    manifest; `cherry retry` puts the old result aside, so the next commit needs a new id (the
    old one belongs to a file Drive has seen)."""
    from test_queue import fake_trainer

    queue = JobQueue(fake_drive_storage(drive), FakeClock())
    manifest = queue.submit(config(tiny_config, name="again"))
    assert queue.request_cancel(manifest.job_id)
    assert queue.try_claim(manifest, WorkerIdentity("w")) is None  # cancelled while queued
    assert job_view(queue, manifest.job_id).state == JobState.cancelled
    retried = queue.retry(manifest.job_id)
    paths = JobPaths(manifest.job_id)
    assert retried.reserved_ids[paths.result] != manifest.reserved_ids[paths.result]
    worker = Worker(JobQueue(fake_drive_storage(drive), FakeClock()), WorkerIdentity("w"),
                    trainer=fake_trainer([]))
    assert worker.run_once()
    assert job_view(queue, manifest.job_id).state == JobState.succeeded
    assert queue.storage.list_dir(f"{paths.dir}/results") == ["1.json"]
    no_duplicates(drive)


def test_a_warm_status_costs_the_same_requests_for_few_or_many_finished_jobs(drive,
                                                                              tiny_config):
    """Status checks every cached row against its job's result.json (issue 28), with a search
    per 50 job folders, not a request per job: 3 finished jobs or 12, the same requests."""
    from cherry_train.client.status import job_rows

    queue = JobQueue(fake_drive_storage(drive), FakeClock())

    def finish(n):
        for _ in range(n):
            manifest = queue.submit(config(tiny_config))
            claim = queue.try_claim(manifest, WorkerIdentity("w"))
            queue.commit(queue.owner(claim), Result(
                job_id=manifest.job_id, state=JobState.succeeded, attempts=1,
                finished_at=queue.clock.now()))

    def warm_status_requests():
        status = JobQueue(fake_drive_storage(drive), FakeClock())  # a new `cherry status`
        job_rows(status)
        before = len(drive.requests)
        rows = job_rows(JobQueue(fake_drive_storage(drive), FakeClock()))
        assert {r["state"] for r in rows} == {"succeeded"}
        return len(drive.requests) - before

    finish(3)
    few = warm_status_requests()
    finish(9)
    assert warm_status_requests() == few
