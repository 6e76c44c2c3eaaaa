"""Talking to the Drive API v3 for DriveStorage (gdrive.py): requests with retries, errors
in words, the pool of reserved file ids, and the folder tree (paths to ids, cached).

Retries: every request is retried with jittered exponential back-off on 429, 403 rate limits,
5xx, timeouts and dropped connections, and never on other errors.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import json
import ssl
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

import structlog

from cherry_train.backoff import Backoff
from cherry_train.storage.base import FileInfo

log = structlog.get_logger(__name__)

FOLDER = "application/vnd.google-apps.folder"
BINARY = "application/octet-stream"
SCOPE = "https://www.googleapis.com/auth/drive"
#: Files up to this size go in one multipart request; larger ones resumably, in chunks.
RETRY_SECONDS = 300.0
MAX_TRIES = 25
_FILE_FIELDS = "id,name,mimeType,size,md5Checksum,createdTime,modifiedTime,parents"
_RATE_REASONS = {"rateLimitExceeded", "userRateLimitExceeded", "sharingRateLimitExceeded"}
#: 403 reasons that mean the Drive's storage is full (the second seen with service accounts).
_FULL_REASONS = {"storageQuotaExceeded", "quotaExceeded"}


class DriveError(RuntimeError):
    """A Drive request that failed for good (retries exhausted, or an error retrying can't fix)."""


class DriveAuthError(DriveError):
    """Missing, expired or refused credentials: one line saying what to do."""


class DriveFull(DriveError):
    """The Drive's storage quota is used up: nothing can be written until space is freed."""


class DriveSetupError(DriveError):
    """An error no retry can fix, that this machine's set-up causes (TLS that cannot be
    verified): one line saying what to check, at once."""


AUTH_HINT = ("run `cherry drive login --client-secrets <client_secret.json>` on this machine "
             "(README: 'Google Drive API root'), or set CHERRY_DRIVE_TOKEN")


# -- which errors are worth retrying -------------------------------------------------------------

def _status(exc: BaseException) -> int | None:
    resp = getattr(exc, "resp", None)
    return getattr(resp, "status", None)


def _reason(exc: BaseException) -> str:
    try:
        body = json.loads(exc.content)  # type: ignore[attr-defined]
        return body["error"]["errors"][0]["reason"]
    except (AttributeError, ValueError, KeyError, IndexError, TypeError):
        return ""


def is_transient(exc: BaseException) -> bool:
    from googleapiclient.errors import HttpError

    if isinstance(exc, HttpError):
        status = _status(exc)
        return status == 429 or (status is not None and status >= 500) or \
            (status == 403 and _reason(exc) in _RATE_REASONS)
    import httplib2

    if isinstance(exc, ssl.SSLCertVerificationError):
        return False  # the same certificate fails the same way every time
    # Timeouts, resets, refused connections, lost DNS: the request may or may not have acted.
    return isinstance(exc, (OSError, httplib2.HttpLib2Error, http.client.HTTPException))


def is_http(exc: BaseException, *statuses: int) -> bool:
    from googleapiclient.errors import HttpError

    return isinstance(exc, HttpError) and _status(exc) in statuses


def md5_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _q(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _when(meta: dict) -> datetime:
    return datetime.fromisoformat(meta["modifiedTime"].replace("Z", "+00:00"))


def _order(meta: dict) -> tuple[str, str]:
    return meta.get("createdTime", ""), meta["id"]


def load_service(http: Any, endpoint: str | None = None):
    """The Drive v3 client from the discovery document packaged with google-api-python-client
    (no network). `endpoint` replaces https://www.googleapis.com/ for API and upload URLs."""
    from googleapiclient.discovery import build_from_document
    from googleapiclient.discovery_cache import get_static_doc

    doc = json.loads(get_static_doc("drive", "v3"))
    if endpoint:
        doc["rootUrl"] = endpoint.rstrip("/") + "/"
        doc["baseUrl"] = doc["rootUrl"] + doc["servicePath"]
    return build_from_document(doc, http=http)


def fresh_folders(method):
    """Run a storage operation; if Drive answers 404 because a cached folder id went stale (the
    folder was deleted by another machine), forget the cached ids and run it once more."""
    @functools.wraps(method)
    def run(self, *args):
        try:
            return method(self, *args)
        except Exception as e:
            if not is_http(e, 404):
                raise
        self._forget()
        with self._lock:
            self._written.clear()
        return method(self, *args)
    return run


class DriveFiles:
    """Requests, ids and folders of one queue root folder; DriveStorage builds the storage
    primitives on them. `http_factory` makes one authorized httplib2.Http-like object per
    thread (httplib2 is not thread-safe; the heartbeat thread shares the storage)."""


    def __init__(self, folder: str, http_factory: Callable[[], Any], *,
                 endpoint: str | None = None, sleep: Callable[[float], None] | None = None,
                 retry_seconds: float = RETRY_SECONDS, max_tries: int = MAX_TRIES,
                 chunk_bytes: int):
        self.folder = folder.strip("/")
        self.description = f"Google Drive folder {self.folder or 'My Drive'} (API)"
        self._http_factory = http_factory
        self._options = {"endpoint": endpoint, "sleep": sleep, "retry_seconds": retry_seconds,
                         "max_tries": max_tries, "chunk_bytes": chunk_bytes}
        self._local = threading.local()
        self.service = load_service(self._http(), endpoint)
        self.chunk_bytes = chunk_bytes
        backoff = Backoff(first=0.5, cap=32, give_up_after=retry_seconds, tries=max_tries,
                          jitter=1)
        self._retrying = backoff.retrying(is_transient, describe=describe_error, sleep=sleep,
                                          event="Drive request failed, retrying")
        self._folders: dict[str, str] = {}  # path -> folder id
        self._reserved: dict[str, str] = {}  # path -> id to create it with
        self._id_pool: list[str] = []
        self._written: dict[str, str] = {}  # path -> id of files this process wrote
        self._lock = threading.RLock()  # folder cache, id pool, folder creation
        self.requests = 0  # made by this process, for benchmarks and the poll-cost test

    # -- plumbing ------------------------------------------------------------------------------

    def _http(self):
        http = getattr(self._local, "http", None)
        if http is None:
            http = self._local.http = self._http_factory()
        return http

    def _retry(self, what: str, fn: Callable[[], Any]) -> Any:
        """fn() with retries on transient errors; a clear DriveError once they run out."""
        from google.auth.exceptions import RefreshError

        try:
            return self._retrying.copy()(fn)
        except RefreshError:
            raise DriveAuthError("Drive refused the credentials (expired or revoked, and they "
                                 f"cannot be refreshed): {AUTH_HINT}") from None
        except Exception as e:
            if is_http(e, 401):
                raise DriveAuthError(f"Drive refused the credentials (401): {AUTH_HINT}") from None
            if isinstance(e, ssl.SSLCertVerificationError):
                why = getattr(e, "verify_message", None) or e  # set by ssl's own handshake
                raise DriveSetupError(
                    f"Drive API: {what}: the server's TLS certificate cannot be verified "
                    f"({why}). A proxy that intercepts TLS, or a machine "
                    "without the CA certificates? Point HTTPLIB2_CA_CERTS at the CA bundle to "
                    "trust") from None
            if is_http(e, 403) and _reason(e) in _FULL_REASONS:
                raise DriveFull(f"Drive API: {what}: the Drive's storage is full "
                                f"({_reason(e)}); free space in it (trashed files count too)"
                                ) from None
            if is_transient(e):
                raise DriveError(f"Drive API: {what} still failing after retries: "
                                 f"{describe_error(e)}") from e
            raise

    def _execute(self, what: str, make: Callable[[], Any]) -> Any:
        def once():
            request = make()
            request.http = self._http()
            self.requests += 1
            return request.execute(num_retries=0)

        return self._retry(what, once)

    def _files(self):
        return self.service.files()

    # -- ids -----------------------------------------------------------------------------------

    def reserve_ids(self, count: int) -> list[str]:
        ids: list[str] = []
        while len(ids) < count:
            n = min(1000, count - len(ids))
            ids += self._execute("generateIds", lambda n=n: self._files().generateIds(
                count=n, space="drive", type="files"))["ids"]
        return ids

    def use_ids(self, ids: dict[str, str]) -> None:
        with self._lock:
            self._reserved.update({p.strip("/"): i for p, i in ids.items()})

    def _new_id(self) -> str:
        with self._lock:
            if not self._id_pool:
                self._id_pool = self.reserve_ids(50)
            return self._id_pool.pop()

    # -- paths ---------------------------------------------------------------------------------

    @staticmethod
    def _split(path: str) -> tuple[str, str]:
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if not parts or ".." in parts:
            raise ValueError(f"path {path!r} leaves the queue root")
        return "/".join(parts[:-1]), parts[-1]

    def _children(self, folder_id: str, name: str | None = None) -> list[dict]:
        """The folder's entries (of one name, if given), earliest created first; all pages."""
        q = f"'{_q(folder_id)}' in parents and trashed = false"
        if name is not None:
            q += f" and name = '{_q(name)}'"
        return self._search(q, "list " + (name or folder_id))

    def _named_in(self, name: str, folder_ids: list[str]) -> list[dict]:
        """The files called `name` in any of these folders, in one search (all pages)."""
        parents = " or ".join(f"'{_q(f)}' in parents" for f in folder_ids)
        return self._search(f"name = '{_q(name)}' and trashed = false and ({parents})",
                            "find " + name)

    def _search(self, q: str, what: str) -> list[dict]:
        """Every file a query finds, earliest created first; all pages."""
        found, token = [], None
        while True:
            page = self._execute(what, lambda t=token: self._files().list(
                q=q, pageSize=1000, pageToken=t, spaces="drive", supportsAllDrives=True,
                includeItemsFromAllDrives=True, fields=f"nextPageToken,files({_FILE_FIELDS})"))
            found += page.get("files", [])
            token = page.get("nextPageToken")
            if not token:
                return sorted(found, key=_order)

    def _root_id(self, create: bool) -> str | None:
        """The id of the queue root folder: `a/b` under My Drive, or `id:<folder id>[/c]`."""
        parts = self.folder.split("/") if self.folder else []
        start = "root"
        if parts and parts[0].startswith("id:"):
            start, parts = parts[0][3:], parts[1:]
        current, path = start, ""
        for part in parts:
            path = f"{path}/{part}"
            current = self._child_folder(current, part, "\0root" + path, create)
            if current is None:
                return None
        return current

    def _folder_id(self, path: str, create: bool) -> str | None:
        """The id of a folder below the root (path "" is the root), made if `create`."""
        with self._lock:
            if path in self._folders:
                return self._folders[path]
        parent_path, _, name = path.rpartition("/")
        parent = self._root_id(create) if not path else self._folder_id(parent_path, create)
        if parent is None:
            return None
        found = parent if not path else self._child_folder(parent, name, path, create)
        if found is not None:
            with self._lock:
                self._folders[path] = found
        return found

    def _child_folder(self, parent: str, name: str, path: str, create: bool) -> str | None:
        reserved = self._reserved.get(path)
        folders = [m for m in self._children(parent, name) if m["mimeType"] == FOLDER]
        if reserved and any(m["id"] == reserved for m in folders):
            return reserved
        if folders:
            return folders[0]["id"]
        if not create:
            return None
        with self._lock:  # one creator per process; other processes are handled below
            folders = [m for m in self._children(parent, name) if m["mimeType"] == FOLDER]
            if folders:
                return folders[0]["id"]
            new_id = reserved or self._new_id()
            try:
                self._execute("create folder " + name, lambda: self._files().create(
                    body={"id": new_id, "name": name, "mimeType": FOLDER, "parents": [parent]},
                    fields="id", supportsAllDrives=True))
            except Exception as e:
                if not is_http(e, 409):
                    raise
                # Ours (an earlier try of this request), or made with the reserved id by
                # another worker: either way, the folder at this path.
            if reserved:
                return new_id
            # Another process may have made the same folder meanwhile: the earliest one wins.
            folders = [m for m in self._children(parent, name) if m["mimeType"] == FOLDER]
            winner = folders[0]["id"] if folders else new_id
            if winner != new_id:
                self._delete_id(new_id)
            return winner

    def _forget(self, path: str = "") -> None:
        with self._lock:
            for key in [k for k in self._folders if k == path or k.startswith(path + "/")
                        or not path]:
                del self._folders[key]

    def _lookup(self, path: str, create_parent: bool = False) -> tuple[str | None, dict | None]:
        """(parent folder id, the file's metadata or None)."""
        parent_path, name = self._split(path)
        parent = self._folder_id(parent_path, create_parent)
        if parent is None:
            return None, None
        return parent, self._the_one(path, self._children(parent, name))

    def _the_one(self, path: str, entries: list[dict]) -> dict | None:
        reserved = self._reserved.get(path)
        for m in entries:
            if m["id"] == reserved:
                return m
        return entries[0] if entries else None

    def _meta(self, file_id: str) -> dict | None:
        try:
            return self._execute("get " + file_id, lambda: self._files().get(
                fileId=file_id, fields=_FILE_FIELDS, supportsAllDrives=True))
        except Exception as e:
            if is_http(e, 404):
                return None
            raise

    def _delete_id(self, file_id: str) -> None:
        try:
            self._execute("delete " + file_id, lambda: self._files().delete(
                fileId=file_id, supportsAllDrives=True))
        except Exception as e:
            if not is_http(e, 404):  # gone already (perhaps by our own lost-response try)
                raise


def file_info(meta: dict) -> FileInfo:
    return FileInfo(size=int(meta.get("size", 0)), modified=_when(meta),
                    is_dir=meta.get("mimeType") == FOLDER)


def describe_error(exc: BaseException | None) -> str:
    """An error in one line, without request headers (they carry the bearer token)."""
    if exc is None:
        return ""
    status = _status(exc)
    if status is not None:
        return f"HTTP {status} {_reason(exc) or ''}".strip()
    return f"{type(exc).__name__}: {exc}"
