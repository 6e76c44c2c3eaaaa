"""A job's end, told to a webhook (Slack, Discord, ntfy): one POST per webhook, from a thread of
its own, after the result is committed, so a slow or dead server never holds up the worker.

One body serves Slack (`text`) and Discord (`content`, with mentions off so a job name cannot
ping a channel); an ntfy server (a host whose name starts with `ntfy`) gets the plain text,
which it shows as the message (JSON posted to an ntfy topic would show as raw JSON). The URL is
never logged: Slack and Discord webhooks carry their secret in the path; lines name the host.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import structlog

from cherry_train.backoff import Backoff
from cherry_train.schemas import Result

log = structlog.get_logger(__name__)

#: About the most one message may take, tries and waits together (plus one try's last few
#: seconds): a dead server costs this much of a background thread, never of a job; a worker's
#: exit waits at most this long for messages still going.
NOTIFY_SECONDS = 30.0
#: After a signal, within the stop's margin (signals.CUT_SHORT_MARGIN_SECONDS).
NOTIFY_AFTER_SIGNAL_SECONDS = 2.0
#: One try's connect and response wait.
TRY_SECONDS = 10.0
RETRIES = Backoff(first=1.0, cap=8.0, give_up_after=NOTIFY_SECONDS)


def host_of(url: str) -> str:
    """What a log line may say about a webhook: its host, never its path or query."""
    return urlsplit(url).hostname or "?"


def reachable(url: str, timeout: float = 5.0) -> str | None:
    """Why the webhook's host cannot be reached from here (a TCP connection, no message
    sent), or None."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as e:
        return f"cannot reach {parts.hostname}:{port} ({type(e).__name__}: {e.strerror or e})"
    return None


def _is_ntfy(url: str) -> bool:
    return host_of(url).startswith("ntfy")


def request_for(url: str, text: str, title: str) -> urllib.request.Request:
    if _is_ntfy(url):
        return urllib.request.Request(url, data=text.encode(), method="POST",
                                      headers={"Title": title.encode().decode("latin-1"),
                                               "Content-Type": "text/plain; charset=utf-8"})
    # Slack wants &, < and > escaped (else `<!channel>` in an error would ping); Discord shows
    # them as they are, and parses no mentions with allowed_mentions empty.
    slack = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    body = {"text": slack, "content": text[:2000], "allowed_mentions": {"parse": []}}
    return urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                  headers={"Content-Type": "application/json"})


def message_of(result: Result, name: str | None, worker_id: str) -> tuple[str, str]:
    """(title, text) for a job's end."""
    title = f"cherry-train: job {result.state.value}"
    text = f"{result.job_id} ({name or 'unnamed'}) {result.state.value} on {worker_id}"
    if result.best is not None:
        best = result.best.model_dump()
        text += f"; best val_accuracy {best['val_accuracy']:.4f} at epoch {best['epoch']}"
    if result.error is not None:
        text += f"; {result.error.type}: {result.error.message[:300]}"
    return title, text


def handed_back_message(job_id: str, name: str | None, worker_id: str,
                        error: BaseException) -> tuple[str, str]:
    return ("cherry-train: job handed back",
            f"{job_id} ({name or 'unnamed'}) handed back by {worker_id} after an error that is "
            f"not the job's ({type(error).__name__}); it resumes from its newest checkpoint")


def _retryable(error: BaseException) -> bool:
    """A server that is down, slow or busy is tried again; one that refuses the message (4xx
    other than 429: a wrong or revoked webhook) is not."""
    if isinstance(error, urllib.error.HTTPError):
        return error.code == 429 or error.code >= 500
    return isinstance(error, OSError)


def _describe(error: BaseException | None) -> str:
    """The error without the URL (an HTTPError's str has none; its .url is never printed)."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code}"
    if isinstance(error, urllib.error.URLError):
        return f"{type(error.reason).__name__}: {error.reason}"
    return f"{type(error).__name__}: {error}" if error is not None else ""


class Notifier:
    """Sends each message to every webhook given, each from a daemon thread; `flush` waits for
    those still going, at most `bound` seconds in all (the worker's exit)."""

    def __init__(self, webhooks: list[str | None], retries: Backoff | None = None,
                 try_seconds: float = TRY_SECONDS):
        self.webhooks = list(dict.fromkeys(w for w in webhooks if w))  # both get it, once
        self.retries, self.try_seconds = retries or RETRIES, try_seconds
        self._threads: list[threading.Thread] = []

    def send(self, title: str, text: str, *, extra: str | None = None) -> None:
        for url in dict.fromkeys([*self.webhooks, *([extra] if extra else [])]):
            thread = threading.Thread(target=self._post, args=(url, title, text),
                                      name=f"notify-{host_of(url)}", daemon=True)
            thread.start()
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]

    def flush(self, bound: float = NOTIFY_SECONDS) -> None:
        end = time.monotonic() + bound
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))

    def _post(self, url: str, title: str, text: str) -> None:
        host, deadline = host_of(url), time.monotonic() + self.retries.give_up_after
        waits = self.retries.waits()  # they end where the next would pass the bound
        while True:
            try:
                timeout = max(0.5, min(self.try_seconds, deadline - time.monotonic()))
                with urllib.request.urlopen(request_for(url, text, title),
                                            timeout=timeout) as response:
                    response.read(1024)
                log.info("notification sent", host=host)
                return
            except Exception as e:  # a message lost is a warning, never the worker's end
                wait = next(waits, None) if _retryable(e) else None
                if wait is None:
                    log.warning("notification not sent; the job itself is unaffected",
                                host=host, error=_describe(e))
                    return
                log.info("webhook not reached; trying again", host=host, error=_describe(e),
                         wait_seconds=wait)
                time.sleep(wait)
