"""A stateful fake of the Google Drive v3 REST API, for tests and benchmarks.

It speaks HTTP as google-api-python-client does: the real client (`build('drive', 'v3', ...)`
from its packaged discovery document) talks to it through `FakeHttp` (in process, in place of
httplib2) or through `serve()` (a real local HTTP server, for CLI subprocesses via
$CHERRY_DRIVE_ENDPOINT). What it implements is what cherry-train uses, with Drive's semantics:

- files.create (metadata only, multipart, resumable), get (metadata, media with Range), list
  (the `q` forms below, pageSize/pageToken, fields), update (metadata, addParents/removeParents,
  media: multipart or resumable), delete (a folder takes its content with it), generateIds,
  changes.getStartPageToken / changes.list, about.get;
- duplicate names in one folder (Drive allows them), `trashed`, 409 for a create with an id in
  use, 404 for unknown ids, a bearer token check (401) when one is configured, a storage quota
  (403 storageQuotaExceeded; about.get's storageQuota) when one is configured;
- faults (`FakeHttp(fault_rate=...)`): 429/500/503/403-rate-limit before the server acts, or the
  connection dropped after it acted (the client never learns whether its request took effect).

`q` forms: clauses joined by `and`: `'<id>' in parents`, `name = '<s>'`, `mimeType = '<s>'`,
`mimeType != '<s>'`, `trashed = false|true`. The wire side (error replies, `fields`, multipart
bodies, resumable sessions) is fakeprotocol.py; this module is what requests do to the files.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import threading
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from cherry_train.testing.fakeprotocol import (
    HttpFailure,
    Upload,
    fields,
    json_reply,
    parse_multipart,
)

FOLDER = "application/vnd.google-apps.folder"
_EPOCH = datetime(2026, 11, 26, tzinfo=timezone.utc)


@dataclass
class FakeFile:
    id: str
    name: str
    mime_type: str
    parents: list[str]
    created: int  # a tick of the fake's clock: strictly increasing, so order is never a tie
    modified: int
    content: bytes = b""
    trashed: bool = False

    def meta(self) -> dict:
        m = {"kind": "drive#file", "id": self.id, "name": self.name, "mimeType": self.mime_type,
             "parents": list(self.parents), "trashed": self.trashed,
             "createdTime": _time(self.created), "modifiedTime": _time(self.modified)}
        if self.mime_type != FOLDER:
            m["size"] = str(len(self.content))
            m["md5Checksum"] = hashlib.md5(self.content).hexdigest()
        return m


def _time(tick: int) -> str:
    return (_EPOCH + timedelta(milliseconds=tick)).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


class FakeDrive:
    """The server's state and its request handler. Thread-safe (one lock)."""

    def __init__(self, token: str | None = None, page_size_cap: int = 1000,
                 quota_bytes: int | None = None):
        self.token = token  # when set, requests must carry "Authorization: Bearer <token>"
        self.page_size_cap = page_size_cap  # Drive may return fewer items than asked for
        self.quota_bytes = quota_bytes  # storage quota: content beyond it is refused (403)
        self.files: dict[str, FakeFile] = {}
        self.uploads: dict[str, Upload] = {}
        self.changes: list[tuple[int, str]] = []  # (change number, file id)
        self.requests: list[tuple[str, str]] = []  # (method, path?query) for every request
        self.response_bytes = 0
        self._lock = threading.RLock()
        self._tick = itertools.count(1)
        self._ids = (f"fake{n:010d}" for n in itertools.count(1))
        self.files["root"] = FakeFile("root", "My Drive", FOLDER, [], 0, 0)

    # -- helpers for tests ---------------------------------------------------------------------

    def children(self, folder_id: str = "root") -> list[FakeFile]:
        with self._lock:
            return [f for f in self.files.values() if folder_id in f.parents and not f.trashed]

    def find(self, path: str) -> list[FakeFile]:
        """Every file at a '/'-separated path under My Drive (duplicates included)."""
        current = [self.files["root"]]
        for part in [p for p in path.split("/") if p]:
            current = [c for f in current for c in self.children(f.id) if c.name == part]
        return current

    def put(self, path: str, content: bytes) -> FakeFile:
        """A file at a '/'-separated path under My Drive, its folders made as needed: what a
        user's own Drive client (the web page, Drive for Desktop) put there, set up without a
        request per file (upload through the API is what the storage tests cover)."""
        *folders, name = [p for p in path.split("/") if p]
        with self._lock:
            parent = "root"
            for part in folders:
                found = [c for c in self.children(parent)
                         if c.name == part and c.mime_type == FOLDER]
                parent = found[0].id if found else self._create(
                    {"name": part, "mimeType": FOLDER, "parents": [parent]}, b"", {})["id"]
            return self.files[self._create({"name": name, "parents": [parent]}, content,
                                           {})["id"]]

    def count(self, method: str | None = None, path_prefix: str = "") -> int:
        return sum(1 for m, p in self.requests
                   if (method is None or m == method) and p.startswith(path_prefix))

    # -- HTTP ----------------------------------------------------------------------------------

    def handle(self, method: str, uri: str, headers: dict[str, str], body: bytes
               ) -> tuple[int, dict[str, str], bytes]:
        headers = {k.lower(): v for k, v in headers.items()}
        parsed = urllib.parse.urlsplit(uri)
        params = {k: v[-1] for k, v in urllib.parse.parse_qs(parsed.query).items()}
        with self._lock:
            self.requests.append((method, parsed.path + ("?" + parsed.query if parsed.query
                                                         else "")))
            try:
                if self.token is not None and \
                        headers.get("authorization") != f"Bearer {self.token}":
                    raise HttpFailure(401, "authError", "Invalid Credentials")
                status, out_headers, out = self._route(method, parsed.path, params, headers,
                                                       body)
            except HttpFailure as e:
                status, out_headers = e.status, {"content-type": "application/json"}
                out = json.dumps({"error": {"code": e.status, "message": e.message, "errors": [
                    {"domain": "global", "reason": e.reason, "message": e.message}]}}).encode()
            self.response_bytes += len(out)
            return status, out_headers, out

    def _route(self, method, path, params, headers, body):
        path = re.sub(r"^/+", "/", path)
        if path.startswith("/upload/drive/v3/resumable/"):
            return self._resume(path.rsplit("/", 1)[1], headers, body)
        m = re.fullmatch(r"(/upload)?/drive/v3/files(?:/([^/]+))?", path)
        if m:
            upload, file_id = bool(m.group(1)), m.group(2)
            if file_id == "generateIds" and method == "GET":
                return json_reply(self._generate_ids(params))
            if upload:
                return self._upload(method, file_id, params, headers, body)
            if method == "GET" and file_id is None:
                return json_reply(self._list(params))
            if method == "GET":
                return self._get(file_id, params, headers)
            if method == "POST" and file_id is None:
                return json_reply(self._create(json.loads(body or b"{}"), b"", params), params)
            if method == "PATCH":
                return json_reply(self._update(file_id, json.loads(body or b"{}"), None,
                                               params), params)
            if method == "DELETE":
                self._delete(file_id)
                return 204, {}, b""
        return self._not_files(method, path, params)

    def _not_files(self, method, path, params):  # about, changes
        if path == "/drive/v3/about" and method == "GET":  # storageQuota, in strings as Drive's
            used = {"usage": str(sum(len(f.content) for f in self.files.values()))}
            limit = {} if self.quota_bytes is None else {"limit": str(self.quota_bytes)}
            return json_reply({"kind": "drive#about", "storageQuota": {**used, **limit}}, params)
        if path == "/drive/v3/changes/startPageToken":
            return json_reply({"kind": "drive#startPageToken",
                               "startPageToken": str(len(self.changes) + 1)})
        if path == "/drive/v3/changes":
            return json_reply(self._changes(params), params)
        raise HttpFailure(404, "notFound", f"no such endpoint: {method} {path}")

    # -- files ---------------------------------------------------------------------------------

    def _file(self, file_id: str) -> FakeFile:
        f = self.files.get(file_id)
        if f is None:
            raise HttpFailure(404, "notFound", f"File not found: {file_id}.")
        return f

    def _touch(self, f: FakeFile) -> None:
        f.modified = next(self._tick)
        self.changes.append((len(self.changes) + 1, f.id))

    def _charge(self, old: int, new: int) -> None:
        """Refuse content that would take the Drive past its quota (trashed files count)."""
        if self.quota_bytes is None:
            return
        used = sum(len(f.content) for f in self.files.values())
        if used - old + new > self.quota_bytes:
            raise HttpFailure(403, "storageQuotaExceeded",
                              "The user's Drive storage quota has been exceeded.")

    def _generate_ids(self, params) -> dict:
        count = int(params.get("count", 10))
        if not 1 <= count <= 1000:
            raise HttpFailure(400, "invalid", "count must be between 1 and 1000")
        return {"kind": "drive#generatedIds", "space": "drive",
                "ids": [f"gen{next(self._ids)}" for _ in range(count)]}

    def _create(self, meta: dict, content: bytes, params) -> dict:
        file_id = meta.get("id") or next(self._ids)
        if file_id in self.files:
            raise HttpFailure(409, "fileIdInUse", "A file already exists with the provided ID.")
        parents = meta.get("parents") or ["root"]
        for p in parents:
            if self._file(p).mime_type != FOLDER:
                raise HttpFailure(400, "invalidParent", f"{p} is not a folder")
        self._charge(0, len(content))
        tick = next(self._tick)
        f = FakeFile(file_id, meta.get("name", "Untitled"),
                     meta.get("mimeType") or "application/octet-stream", list(parents),
                     tick, tick, content)
        self.files[file_id] = f
        self._touch(f)
        return f.meta()

    def _update(self, file_id: str, meta: dict, content: bytes | None, params) -> dict:
        f = self._file(file_id)
        if content is not None:
            self._charge(len(f.content), len(content))
        if "name" in meta:
            f.name = meta["name"]
        if "trashed" in meta:
            f.trashed = bool(meta["trashed"])
        for p in filter(None, params.get("removeParents", "").split(",")):
            if p in f.parents:  # removing a parent the file no longer has changes nothing
                f.parents.remove(p)
        for p in filter(None, params.get("addParents", "").split(",")):
            if self._file(p).mime_type != FOLDER:
                raise HttpFailure(400, "invalidParent", f"{p} is not a folder")
            if p not in f.parents:
                f.parents.append(p)
        if content is not None:
            f.content = content
        self._touch(f)
        return f.meta()

    def _delete(self, file_id: str) -> None:
        f = self._file(file_id)
        for child in [c for c in self.files.values() if file_id in c.parents]:
            self._delete(child.id)
        del self.files[f.id]
        self.changes.append((len(self.changes) + 1, f.id))

    def _get(self, file_id: str, params, headers):
        f = self._file(file_id)
        if params.get("alt") != "media":
            return json_reply(f.meta(), params)
        if f.mime_type == FOLDER:
            raise HttpFailure(403, "fileNotDownloadable", "Only files with binary content "
                              "can be downloaded.")
        data, total, rng = f.content, len(f.content), headers.get("range")
        if not rng:
            return 200, {"content-type": f.mime_type, "content-length": str(total)}, data
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
        start, end = int(m.group(1)), min(int(m.group(2)) if m.group(2) else total - 1, total - 1)
        if start >= total:
            return 416, {"content-range": f"bytes */{total}"}, b""
        return 206, {"content-type": f.mime_type, "content-range": f"bytes {start}-{end}/{total}",
                     "content-length": str(end - start + 1)}, data[start:end + 1]

    def _list(self, params) -> dict:
        matches = self._query(params.get("q", ""))
        matches.sort(key=lambda f: (f.created, f.id))  # a stable order for page tokens
        start = int(params.get("pageToken", 0))
        size = min(int(params.get("pageSize", 100)), self.page_size_cap)
        page = matches[start:start + size]
        out = {"kind": "drive#fileList", "incompleteSearch": False,
               "files": [f.meta() for f in page]}
        if start + size < len(matches):
            out["nextPageToken"] = str(start + size)
        return fields(out, params.get("fields"))

    def _query(self, q: str) -> list[FakeFile]:
        tests = []
        for clause in filter(None, (c.strip() for c in re.split(r"\s+and\s+", q))):
            inner = m.group(1) if (m := re.fullmatch(r"\((.*)\)", clause)) else clause
            parents = [re.fullmatch(r"'((?:[^'\\]|\\.)*)'\s+in\s+parents", c.strip())
                       for c in re.split(r"\s+or\s+", inner)]
            if all(parents):  # 'a' in parents, or ('a' in parents or 'b' in parents)
                wanted = frozenset(_unescape(p.group(1)) for p in parents)
                tests.append(lambda f, w=wanted: bool(w & set(f.parents)))
            elif m := re.fullmatch(r"(name|mimeType)\s*(=|!=)\s*'((?:[^'\\]|\\.)*)'", clause):
                key = "name" if m.group(1) == "name" else "mime_type"
                value, negate = _unescape(m.group(3)), m.group(2) == "!="
                tests.append(lambda f, k=key, v=value, n=negate: (getattr(f, k) == v) != n)
            elif m := re.fullmatch(r"trashed\s*=\s*(true|false)", clause):
                wanted = m.group(1) == "true"
                tests.append(lambda f, t=wanted: f.trashed == t)
            else:
                raise HttpFailure(400, "invalid", f"Invalid Value: unsupported query {clause!r}")
        return [f for f in self.files.values() if f.id != "root" and all(t(f) for t in tests)]

    def _changes(self, params) -> dict:
        start = int(params["pageToken"])
        size = min(int(params.get("pageSize", 100)), self.page_size_cap)
        page = [c for c in self.changes if c[0] >= start][:size]
        out = {"kind": "drive#changeList", "changes": []}
        for _, file_id in page:
            f = self.files.get(file_id)
            out["changes"].append({"kind": "drive#change", "fileId": file_id,
                                   "removed": f is None, **({"file": f.meta()} if f else {})})
        if page and page[-1][0] < len(self.changes):
            out["nextPageToken"] = str(page[-1][0] + 1)
        else:
            out["newStartPageToken"] = str(len(self.changes) + 1)
        return out

    # -- uploads -------------------------------------------------------------------------------

    def _upload(self, method, file_id, params, headers, body):
        kind = params.get("uploadType")
        if kind == "multipart":
            meta, content = parse_multipart(headers["content-type"], body)
            return json_reply(self._apply(method, file_id, meta, content, params), params)
        if kind == "media":
            return json_reply(self._apply(method, file_id, {}, body, params), params)
        if kind == "resumable":
            if file_id is not None:
                self._file(file_id)
            session = f"s{next(self._ids)}"
            total = headers.get("x-upload-content-length")
            self.uploads[session] = Upload(method, file_id, json.loads(body or b"{}"), params,
                                           int(total) if total else None)
            location = f"https://fake.invalid/upload/drive/v3/resumable/{session}"
            return 200, {"location": location}, b""
        raise HttpFailure(400, "invalid", f"unsupported uploadType {kind!r}")

    def _apply(self, method, file_id, meta, content, params) -> dict:
        if method == "POST":
            return self._create(meta, content, params)
        return self._update(file_id, meta, content, params)

    def _resume(self, session: str, headers, body):
        up = self.uploads.get(session)
        if up is None:
            raise HttpFailure(404, "notFound", "upload session expired")
        if up.done is None and up.take(headers.get("content-range", ""), body):
            up.done = self._apply(up.method, up.file_id, up.meta, bytes(up.data), up.params)
        if up.done is not None:
            return json_reply(up.done)
        return 308, ({"range": f"bytes=0-{len(up.data) - 1}"} if up.data else {}), b""


def _unescape(s: str) -> str:
    return re.sub(r"\\(.)", r"\1", s)
