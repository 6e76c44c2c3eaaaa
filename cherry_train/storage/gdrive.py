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

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from cherry_train import files
from cherry_train.checksums import file_md5
from cherry_train.storage.base import FileInfo, Storage
from cherry_train.storage.gdrive_api import (
    BINARY,
    FOLDER,
    MAX_TRIES,
    RETRY_SECONDS,
    DriveError,
    DriveFiles,
    file_info,
    fresh_folders,
    is_http,
    md5_of,
)

log = structlog.get_logger(__name__)

SIMPLE_UPLOAD_LIMIT = 5 * 1024 * 1024
CHUNK_BYTES = 16 * 1024 * 1024  # a multiple of 256 KiB, as Drive requires
#: The longest search query built here (`'a' in parents or ...`): the client sends longer
#: URLs than 2 KB as a POST instead; 1,500 characters name about 25 Drive folders.
SEARCH_CHARS = 1500


class DriveStorage(DriveFiles, Storage):
    """See the module docstring. `http_factory` makes one authorized httplib2.Http-like object
    per thread (httplib2 is not thread-safe; the heartbeat thread shares this storage)."""

    def __init__(self, folder: str, http_factory: Callable[[], Any], *,
                 endpoint: str | None = None, sleep: Callable[[float], None] | None = None,
                 retry_seconds: float = RETRY_SECONDS, max_tries: int = MAX_TRIES,
                 chunk_bytes: int = CHUNK_BYTES):
        super().__init__(folder, http_factory, endpoint=endpoint, sleep=sleep,
                         retry_seconds=retry_seconds, max_tries=max_tries,
                         chunk_bytes=chunk_bytes)

    def sibling(self, folder: str) -> DriveStorage:
        """Another folder of the same Drive, with the same credentials and settings ("" is My
        Drive itself): for data paths outside the queue folder."""
        return DriveStorage(folder, self._http_factory, **self._options)

    # -- the storage interface -----------------------------------------------------------------

    def free_bytes(self) -> int | None:
        """The Drive's quota less its usage (trash included), from about.get; None for a
        Drive without a limit (some Workspace accounts), and for a root in a shared drive: its
        files count against the shared drive's limits, not the user's quota about.get gives."""
        if self._in_shared_drive():
            return None
        quota = self._execute("about.get", lambda: self.service.about().get(
            fields="storageQuota"))["storageQuota"]
        if "limit" not in quota:
            return None
        return max(0, int(quota["limit"]) - int(quota.get("usage", 0)))

    def _in_shared_drive(self) -> bool:
        """Only an `id:<folder>` root can be in a shared drive (a path is under My Drive)."""
        first = self.folder.split("/")[0] if self.folder else ""
        if not first.startswith("id:"):
            return False
        meta = self._execute("root's drive", lambda: self._files().get(
            fileId=first[3:], fields="driveId", supportsAllDrives=True))
        return bool(meta.get("driveId"))

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
            if is_http(e, 404):
                raise FileNotFoundError(path) from None
            if is_http(e, 416):
                return b""
            raise

    @fresh_folders
    def read_range(self, path: str, offset: int, length: int) -> bytes:
        _, meta = self._lookup(path)
        if meta is None:
            raise FileNotFoundError(path)
        if length <= 0 or offset >= int(meta.get("size", 0)):
            return b""
        return self._media(path, meta["id"], f"bytes={offset}-{offset + length - 1}")

    @fresh_folders
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
                if not is_http(e, 404):
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
            if not is_http(e, 409):
                raise
        meta = self._meta(file_id)
        return meta is not None and parent in meta.get("parents", []) and \
            meta.get("md5Checksum") == md5_of(data) and meta.get("name") == name

    @fresh_folders
    def create_exclusive(self, path: str, data: bytes) -> bool:
        parent, meta = self._lookup(path, create_parent=True)
        reserved = self._reserved.get(path.strip("/"))
        if meta is not None and (reserved is None or meta["id"] == reserved):
            return meta.get("md5Checksum") == md5_of(data)  # taken (by us, if it holds our data)
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
        return winner.get("md5Checksum") == md5_of(data)

    @fresh_folders
    def list_dir(self, path: str) -> list[str]:
        folder = self._folder_id(path.strip("/"), create=False)
        return [] if folder is None else sorted({m["name"] for m in self._children(folder)})

    @fresh_folders
    def list_entries(self, path: str) -> dict[str, FileInfo]:
        """name -> size and time of every entry in a folder, in one listing."""
        folder = self._folder_id(path.strip("/"), create=False)
        if folder is None:
            return {}
        out: dict[str, FileInfo] = {}
        for m in self._children(folder):
            out.setdefault(m["name"], file_info(m))  # earliest of duplicates
        return out

    @fresh_folders
    def stat_in_subfolders(self, path: str, name: str) -> dict[str, FileInfo]:
        """As the interface says, in 1 + subfolders / 25 requests rather than one per subfolder:
        the folder's listing gives the subfolders' ids, a search finds `name` in 25 of them."""
        folder = self._folder_id(path.strip("/"), create=False)
        if folder is None:
            return {}
        by_name: dict[str, str] = {}  # of duplicate names the earliest, as paths resolve
        for m in self._children(folder):
            if m["mimeType"] == FOLDER:
                by_name.setdefault(m["name"], m["id"])
        subfolders = {folder_id: sub for sub, folder_id in by_name.items()}
        batches: list[list[str]] = [[]]
        for folder_id in subfolders:
            if len(batches[-1]) * (len(folder_id) + 20) > SEARCH_CHARS:  # "'id' in parents or "
                batches.append([])
            batches[-1].append(folder_id)
        found: dict[str, FileInfo] = {}
        for batch in filter(None, batches):
            for m in self._named_in(name, batch):
                for parent in m.get("parents", []):
                    if parent in subfolders and m["mimeType"] != FOLDER:
                        found.setdefault(subfolders[parent], file_info(m))  # earliest
        return found

    @fresh_folders
    def md5(self, path: str) -> str | None:
        """Drive's md5 of the file's content, or None if there is no such file."""
        _, meta = self._lookup(path)
        return None if meta is None else meta.get("md5Checksum")

    @fresh_folders
    def stat(self, path: str) -> FileInfo | None:
        if not path.strip("/"):
            root = self._root_id(create=False)
            meta = None if root is None else self._meta(root)  # None: no such (visible) folder
            return None if meta is None else file_info(meta)
        _, meta = self._lookup(path)
        return None if meta is None else file_info(meta)

    @fresh_folders
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
            if is_http(e, 404):
                raise FileNotFoundError(src) from None
            raise
        for file_id in replaced:  # after the move: dst is never missing in between
            self._delete_id(file_id)
        self._drop_written(src, dst)

    @fresh_folders
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

    @fresh_folders
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
            if update or not is_http(e, 409):
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
                if is_http(e, 404, 410):
                    state["request"] = make()
                    raise ConnectionResetError("upload session expired; starting over") from e
                raise
            self.requests += 1

        while state["response"] is None:
            self._retry("upload " + path, step)
        return state["response"]

    @fresh_folders
    def download(self, path: str, local: Path) -> None:
        from googleapiclient.http import MediaIoBaseDownload

        _, meta = self._lookup(path)
        if meta is None:
            raise FileNotFoundError(path)
        with files.replacing(Path(local)) as tmp:
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
