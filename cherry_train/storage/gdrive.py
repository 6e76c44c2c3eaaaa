"""A queue root in Google Drive, through the Drive API v3 (`--root gdrive:<folder path>`).

Drive is not a file system, so each primitive of the storage interface is built with care:

- Paths: folders are resolved name by name from the root folder and their ids cached (dropped
  and resolved again when Drive answers 404). Files are looked up on every use, since another
  machine may move or replace them.
- Duplicate names: Drive allows many files of one name in a folder. Everywhere, "the" file at a
  path is the earliest created one (then the smallest id): writers update it, readers read it,
  an exclusive create is won by it. Later duplicates are removed when noticed.
- Retries: every request is retried with jittered exponential back-off on 429, 403 rate limits,
  5xx, timeouts and dropped connections, and never on other errors. Creates carry ids reserved
  with files.generateIds, so a create repeated after a lost response gets 409 (then the file is
  checked to be ours) instead of making a second file.
- Exclusive create: with an id reserved for the path beforehand (`use_ids`, from the manifest or
  the previous attempt record), Drive itself arbitrates: the second create of one id gets 409.
  Without one, the file is created and the folder read back: the earliest created file wins and
  the others delete their copies.
- Large files go through resumable uploads and chunked downloads; both are checked against
  Drive's md5Checksum, so a file counts as stored only once Drive holds exactly its bytes.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import io
import json
import os
import ssl
import threading
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from cherry_train.checksums import file_md5
from cherry_train.storage.base import FileInfo, Storage

log = structlog.get_logger(__name__)

FOLDER = "application/vnd.google-apps.folder"
BINARY = "application/octet-stream"
SCOPE = "https://www.googleapis.com/auth/drive"
#: Files up to this size go in one multipart request; larger ones resumably, in chunks.
SIMPLE_UPLOAD_LIMIT = 5 * 1024 * 1024
CHUNK_BYTES = 16 * 1024 * 1024  # a multiple of 256 KiB, as Drive requires
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


def _is_http(exc: BaseException, *statuses: int) -> bool:
    from googleapiclient.errors import HttpError

    return isinstance(exc, HttpError) and _status(exc) in statuses


def _md5(data: bytes) -> str:
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


def _fresh_folders(method):
    """Run a storage operation; if Drive answers 404 because a cached folder id went stale (the
    folder was deleted by another machine), forget the cached ids and run it once more."""
    @functools.wraps(method)
    def run(self, *args):
        try:
            return method(self, *args)
        except Exception as e:
            if not _is_http(e, 404):
                raise
        self._forget()
        with self._lock:
            self._written.clear()
        return method(self, *args)
    return run


class DriveStorage(Storage):
    """See the module docstring. `http_factory` makes one authorized httplib2.Http-like object
    per thread (httplib2 is not thread-safe; the heartbeat thread shares this storage)."""

    def __init__(self, folder: str, http_factory: Callable[[], Any], *,
                 endpoint: str | None = None, sleep: Callable[[float], None] | None = None,
                 retry_seconds: float = RETRY_SECONDS, max_tries: int = MAX_TRIES,
                 chunk_bytes: int = CHUNK_BYTES):
        self.folder = folder.strip("/")
        self.description = f"Google Drive folder {self.folder or 'My Drive'} (API)"
        self._http_factory = http_factory
        self._options = {"endpoint": endpoint, "sleep": sleep, "retry_seconds": retry_seconds,
                         "max_tries": max_tries, "chunk_bytes": chunk_bytes}
        self._local = threading.local()
        self.service = load_service(self._http(), endpoint)
        self.chunk_bytes = chunk_bytes
        kwargs = {"sleep": sleep} if sleep is not None else {}
        self._retrying = Retrying(
            retry=retry_if_exception(is_transient),
            wait=wait_exponential(multiplier=0.5, max=32) + wait_random(0, 1),
            stop=stop_after_delay(retry_seconds) | stop_after_attempt(max_tries),
            before_sleep=self._log_retry, reraise=True, **kwargs)
        self._folders: dict[str, str] = {}  # path -> folder id
        self._reserved: dict[str, str] = {}  # path -> id to create it with
        self._id_pool: list[str] = []
        self._written: dict[str, str] = {}  # path -> id of files this process wrote
        self._lock = threading.RLock()  # folder cache, id pool, folder creation
        self.requests = 0  # made by this process, for benchmarks and the poll-cost test

    def sibling(self, folder: str) -> DriveStorage:
        """Another folder of the same Drive, with the same credentials and settings ("" is My
        Drive itself): for data paths outside the queue folder."""
        return DriveStorage(folder, self._http_factory, **self._options)

    # -- plumbing ------------------------------------------------------------------------------

    def _http(self):
        http = getattr(self._local, "http", None)
        if http is None:
            http = self._local.http = self._http_factory()
        return http

    @staticmethod
    def _log_retry(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("Drive request failed, retrying", error=_describe(exc),
                    attempt=state.attempt_number,
                    wait_seconds=round(state.next_action.sleep, 2) if state.next_action else None)

    def _retry(self, what: str, fn: Callable[[], Any]) -> Any:
        """fn() with retries on transient errors; a clear DriveError once they run out."""
        from google.auth.exceptions import RefreshError

        try:
            return self._retrying.copy()(fn)
        except RefreshError:
            raise DriveAuthError("Drive refused the credentials (expired or revoked, and they "
                                 f"cannot be refreshed): {AUTH_HINT}") from None
        except Exception as e:
            if _is_http(e, 401):
                raise DriveAuthError(f"Drive refused the credentials (401): {AUTH_HINT}") from None
            if isinstance(e, ssl.SSLCertVerificationError):
                why = getattr(e, "verify_message", None) or e  # set by ssl's own handshake
                raise DriveSetupError(
                    f"Drive API: {what}: the server's TLS certificate cannot be verified "
                    f"({why}). A proxy that intercepts TLS, or a machine "
                    "without the CA certificates? Point HTTPLIB2_CA_CERTS at the CA bundle to "
                    "trust") from None
            if _is_http(e, 403) and _reason(e) in _FULL_REASONS:
                raise DriveFull(f"Drive API: {what}: the Drive's storage is full "
                                f"({_reason(e)}); free space in it (trashed files count too)"
                                ) from None
            if is_transient(e):
                raise DriveError(f"Drive API: {what} still failing after retries: "
                                 f"{_describe(e)}") from e
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
        found, token = [], None
        while True:
            page = self._execute("list " + (name or folder_id), lambda t=token: self._files().list(
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
                if not _is_http(e, 409):
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
            if _is_http(e, 404):
                return None
            raise

    def _delete_id(self, file_id: str) -> None:
        try:
            self._execute("delete " + file_id, lambda: self._files().delete(
                fileId=file_id, supportsAllDrives=True))
        except Exception as e:
            if not _is_http(e, 404):  # gone already (perhaps by our own lost-response try)
                raise

    # -- the storage interface -----------------------------------------------------------------

    @_fresh_folders
    def read_bytes(self, path: str) -> bytes:
        _, meta = self._lookup(path)
        if meta is None:
            raise FileNotFoundError(path)
        if meta["mimeType"] == FOLDER:
            raise IsADirectoryError(path)
        return self._media(path, meta["id"])

    def _media(self, path: str, file_id: str, byte_range: str | None = None) -> bytes:
        def make():
            request = self._files().get_media(fileId=file_id, supportsAllDrives=True)
            if byte_range:
                request.headers["range"] = byte_range
            return request

        try:
            return self._execute("download " + path, make)
        except Exception as e:
            if _is_http(e, 404):
                raise FileNotFoundError(path) from None
            if _is_http(e, 416):
                return b""
            raise

    @_fresh_folders
    def read_range(self, path: str, offset: int, length: int) -> bytes:
        _, meta = self._lookup(path)
        if meta is None:
            raise FileNotFoundError(path)
        if length <= 0 or offset >= int(meta.get("size", 0)):
            return b""
        return self._media(path, meta["id"], f"bytes={offset}-{offset + length - 1}")

    @_fresh_folders
    def write_atomic(self, path: str, data: bytes) -> None:
        # Drive replaces a file's content in one step (a reader gets the old revision or the
        # new one), so updating in place is the atomic write; a new file is one create.
        key = path.strip("/")
        with self._lock:
            known = self._written.get(key)
        if known is not None:
            # Rewriting a file this process wrote before (heartbeat, worker status): one
            # request. Nobody else moves such files; one deleted meanwhile is looked up again.
            try:
                self._put_media(path, known, data)
                return
            except Exception as e:
                if not _is_http(e, 404):
                    raise
        parent, meta = self._lookup(path, create_parent=True)
        if meta is not None:
            file_id = meta["id"]
            self._put_media(path, file_id, data)
        else:
            file_id = self._reserved.get(key) or self._new_id()
            if not self._create(path, parent, data, file_id):
                # Made with this path's reserved id by someone else: replace its content.
                self._put_media(path, file_id, data)
        with self._lock:
            self._written[key] = file_id

    def _put_media(self, path: str, file_id: str, data: bytes) -> None:
        from googleapiclient.http import MediaIoBaseUpload

        self._execute("write " + path, lambda: self._files().update(
            fileId=file_id, media_body=MediaIoBaseUpload(io.BytesIO(data), BINARY),
            fields="id", supportsAllDrives=True))

    def _create(self, path: str, parent: str, data: bytes, file_id: str | None = None) -> bool:
        """Create the file with the path's reserved id (else a fresh one). True if the file with
        that id now holds our bytes: made by this call, or by an earlier try of it whose
        response was lost (Drive answers 409 to the repeat)."""
        from googleapiclient.http import MediaIoBaseUpload

        _, name = self._split(path)
        file_id = file_id or self._reserved.get(path.strip("/")) or self._new_id()
        try:
            self._execute("create " + path, lambda: self._files().create(
                body={"id": file_id, "name": name, "parents": [parent]},
                media_body=MediaIoBaseUpload(io.BytesIO(data), BINARY, resumable=False),
                fields="id", supportsAllDrives=True))
            return True
        except Exception as e:
            if not _is_http(e, 409):
                raise
        meta = self._meta(file_id)
        return meta is not None and parent in meta.get("parents", []) and \
            meta.get("md5Checksum") == _md5(data) and meta.get("name") == name

    @_fresh_folders
    def create_exclusive(self, path: str, data: bytes) -> bool:
        parent, meta = self._lookup(path, create_parent=True)
        reserved = self._reserved.get(path.strip("/"))
        if meta is not None and (reserved is None or meta["id"] == reserved):
            return meta.get("md5Checksum") == _md5(data)  # taken (by us, if it holds our data)
        if reserved is not None:
            return self._create(path, parent, data)  # Drive arbitrates: one create per id
        mine = self._new_id()
        self._create(path, parent, data, file_id=mine)
        _, name = self._split(path)
        entries = self._children(parent, name)
        winner = entries[0] if entries else None
        if winner is None or winner["id"] == mine:
            return True
        self._delete_id(mine)  # a later duplicate: the earliest created file is the one
        return winner.get("md5Checksum") == _md5(data)

    @_fresh_folders
    def list_dir(self, path: str) -> list[str]:
        folder = self._folder_id(path.strip("/"), create=False)
        return [] if folder is None else sorted({m["name"] for m in self._children(folder)})

    @_fresh_folders
    def list_entries(self, path: str) -> dict[str, FileInfo]:
        """name -> size and time of every entry in a folder, in one listing."""
        folder = self._folder_id(path.strip("/"), create=False)
        if folder is None:
            return {}
        out: dict[str, FileInfo] = {}
        for m in self._children(folder):
            out.setdefault(m["name"], _info(m))  # earliest of duplicates
        return out

    @_fresh_folders
    def md5(self, path: str) -> str | None:
        """Drive's md5 of the file's content, or None if there is no such file."""
        _, meta = self._lookup(path)
        return None if meta is None else meta.get("md5Checksum")

    @_fresh_folders
    def stat(self, path: str) -> FileInfo | None:
        if not path.strip("/"):
            root = self._root_id(create=False)
            meta = None if root is None else self._meta(root)  # None: no such (visible) folder
            return None if meta is None else _info(meta)
        _, meta = self._lookup(path)
        return None if meta is None else _info(meta)

    @_fresh_folders
    def move(self, src: str, dst: str) -> None:
        src_parent, meta = self._lookup(src)
        if meta is None:
            raise FileNotFoundError(src)
        dst_parent, _ = self._lookup(dst, create_parent=True)
        _, name = self._split(dst)
        replaced = [m["id"] for m in self._children(dst_parent, name) if m["id"] != meta["id"]]
        kwargs = {"addParents": dst_parent, "removeParents": src_parent} \
            if dst_parent != src_parent else {}
        try:
            self._execute(f"move {src} to {dst}", lambda: self._files().update(
                fileId=meta["id"], body={"name": name}, fields="id", supportsAllDrives=True,
                **kwargs))
        except Exception as e:
            if _is_http(e, 404):
                raise FileNotFoundError(src) from None
            raise
        for file_id in replaced:  # after the move: dst is never missing in between
            self._delete_id(file_id)
        self._drop_written(src, dst)

    @_fresh_folders
    def delete(self, path: str) -> None:
        parent_path, name = self._split(path)
        parent = self._folder_id(parent_path, create=False)
        if parent is None:
            return
        for m in self._children(parent, name):
            self._delete_id(m["id"])  # a folder goes with everything in it
        self._forget(path.strip("/"))
        self._drop_written(path)

    def _drop_written(self, *paths: str) -> None:
        with self._lock:
            for path in paths:
                key = path.strip("/")
                for k in [k for k in self._written if k == key or k.startswith(key + "/")]:
                    del self._written[k]

    @_fresh_folders
    def upload(self, local: Path, path: str) -> None:
        local = Path(local)
        parent, meta = self._lookup(path, create_parent=True)
        size, md5 = local.stat().st_size, file_md5(local)
        if meta is not None and meta.get("md5Checksum") == md5:
            return  # already there (a repeated upload)
        _, name = self._split(path)
        file_id = meta["id"] if meta is not None else \
            self._reserved.get(path.strip("/")) or self._new_id()
        stored = self._upload_file(local, path, size, file_id, name, parent,
                                   update=meta is not None)
        if stored.get("md5Checksum") != md5:
            raise DriveError(f"Drive API: upload of {path} stored different bytes "
                             f"(md5 {stored.get('md5Checksum')} != {md5}); not counted as saved")

    def _upload_file(self, local: Path, path: str, size: int, file_id: str, name: str,
                     parent: str, update: bool) -> dict:
        from googleapiclient.http import MediaFileUpload

        fields = "id,md5Checksum,size"
        resumable = size > SIMPLE_UPLOAD_LIMIT

        def make():
            media = MediaFileUpload(str(local), mimetype=BINARY, resumable=resumable,
                                    chunksize=self.chunk_bytes if resumable else -1)
            if update:
                request = self._files().update(fileId=file_id, media_body=media, fields=fields,
                                               supportsAllDrives=True)
            else:
                request = self._files().create(
                    body={"id": file_id, "name": name, "parents": [parent]}, media_body=media,
                    fields=fields, supportsAllDrives=True)
            request.http = self._http()
            return request

        try:
            if not resumable:
                return self._execute("upload " + path, make)
            return self._resumable(path, make)
        except Exception as e:
            if update or not _is_http(e, 409):
                raise
        # 409: a file with our id exists: ours, from a try whose response was lost, or not.
        return self._meta(file_id) or {}

    def _resumable(self, path: str, make: Callable[[], Any]) -> dict:
        """Send a resumable upload chunk by chunk; after an error, ask Drive how much it has and
        go on from there. An expired session (404/410) starts over."""
        state = {"request": make(), "response": None}

        def step():
            try:
                _, state["response"] = state["request"].next_chunk(http=self._http())
            except Exception as e:
                if _is_http(e, 404, 410):
                    state["request"] = make()
                    raise ConnectionResetError("upload session expired; starting over") from e
                raise
            self.requests += 1

        while state["response"] is None:
            self._retry("upload " + path, step)
        return state["response"]

    @_fresh_folders
    def download(self, path: str, local: Path) -> None:
        from googleapiclient.http import MediaIoBaseDownload

        _, meta = self._lookup(path)
        if meta is None:
            raise FileNotFoundError(path)
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
        try:
            with open(tmp, "wb") as f:
                request = self._files().get_media(fileId=meta["id"], supportsAllDrives=True)
                request.http = self._http()
                downloader = MediaIoBaseDownload(f, request, chunksize=self.chunk_bytes)
                done = int(meta.get("size", 0)) == 0
                while not done:
                    _, done = self._retry("download " + path, downloader.next_chunk)
                    self.requests += 1
            expected = meta.get("md5Checksum")  # Google Docs have none: nothing to compare
            if expected is not None and file_md5(tmp) != expected:
                raise DriveError(f"Drive API: download of {path} does not match its md5")
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)


def _info(meta: dict) -> FileInfo:
    return FileInfo(size=int(meta.get("size", 0)), modified=_when(meta),
                    is_dir=meta.get("mimeType") == FOLDER)


def _describe(exc: BaseException | None) -> str:
    """An error in one line, without request headers (they carry the bearer token)."""
    if exc is None:
        return ""
    status = _status(exc)
    if status is not None:
        return f"HTTP {status} {_reason(exc) or ''}".strip()
    return f"{type(exc).__name__}: {exc}"
