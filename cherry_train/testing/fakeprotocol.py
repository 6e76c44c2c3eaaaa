"""The wire side of the fake Drive (fakedrive.py): its error replies, partial responses
(`fields`), multipart bodies and resumable upload sessions, as Drive v3 speaks them. What a
request does to the files (create, update, list) stays in fakedrive.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from email import message_from_bytes
from email.policy import HTTP


class HttpFailure(Exception):
    """An error reply: Drive's JSON error body with this status and reason."""

    def __init__(self, status: int, reason: str, message: str = ""):
        super().__init__(message or reason)
        self.status, self.reason, self.message = status, reason, message or reason


@dataclass
class Upload:
    """A resumable upload session."""

    method: str  # POST (create) or PATCH (update)
    file_id: str | None
    meta: dict
    params: dict
    total: int | None = None
    data: bytearray = field(default_factory=bytearray)
    done: dict | None = None  # the file's metadata once its last byte came

    def take(self, content_range: str, body: bytes) -> bool:
        """One request's chunk (`Content-Range: bytes a-b/total`, or `bytes */total` to ask
        or to say the size; none: the whole file in one request). True once it is whole."""
        m = re.fullmatch(r"bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)", content_range)
        if m is None:  # no range: the whole (here: empty) file in one request
            self.data += body
            self.total = len(self.data)
        elif m.group(3) != "*":
            self.total = int(m.group(3))
        if m is not None and m.group(1) is not None:
            start, end = int(m.group(1)), int(m.group(2))
            if start != len(self.data):
                raise HttpFailure(400, "badContentRange",
                                  f"chunk starts at {start}, expected {len(self.data)}")
            if len(body) != end - start + 1:
                raise HttpFailure(400, "badContentRange", "chunk length mismatch")
            self.data += body
        return self.total is not None and len(self.data) >= self.total


def json_reply(obj: dict, params: dict | None = None):
    """200 with `obj` as JSON, cut to the request's `fields` (lists apply their own)."""
    if params and params.get("fields") and "files" not in obj and "changes" not in obj:
        obj = fields(obj, params["fields"])
    return 200, {"content-type": "application/json; charset=UTF-8"}, json.dumps(obj).encode()


def fields(obj: dict, spec: str | None) -> dict:
    """A partial response: `a,b,files(c,d)` keeps those keys (one level of nesting)."""
    if not spec or spec == "*":
        return obj
    wanted: dict[str, set[str] | None] = {}
    for m in re.finditer(r"(\w+)(?:\(([^)]*)\))?", spec):
        wanted[m.group(1)] = set(m.group(2).split(",")) if m.group(2) else None
    out = {}
    for key, sub in ((k, sub) for k, sub in wanted.items() if k in obj):
        value = obj[key]
        if sub is not None and isinstance(value, list):
            value = [{k: v for k, v in item.items() if k in sub} for item in value]
        out[key] = value
    return out


def parse_multipart(content_type: str, body: bytes) -> tuple[dict, bytes]:
    """A multipart/related upload's metadata (its JSON part) and content."""
    msg = message_from_bytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body,
                             policy=HTTP)
    parts = list(msg.iter_parts())
    meta = json.loads(parts[0].get_payload(decode=True) or b"{}")
    content = parts[1].get_payload(decode=True) if len(parts) > 1 else b""
    return meta, content
