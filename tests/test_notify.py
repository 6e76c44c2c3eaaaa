"""A job's end told to a webhook (issue 27 item 3): real sockets on 127.0.0.1, a server that
answers, one that fails first, and one that is down; the job never waits for any of them."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import structlog
from test_queue import fake_trainer

from cherry_train.backoff import Backoff
from cherry_train.cli import main
from cherry_train.jobqueue.claims import WorkerIdentity
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.schemas import ConfigError, validate_config
from cherry_train.storage import LocalStorage
from cherry_train.worker.loop import Worker, WorkerOptions
from cherry_train.worker.reporting import notify

SECRET = "T000/B000/s3cr3t-token"


class Hook:
    """A webhook on 127.0.0.1: records each POST; answers `codes` in turn, then 200."""

    def __init__(self, codes=(), delay=0.0):
        self.posts, self.codes, self.delay = [], list(codes), delay
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.posts.append((self.path, dict(self.headers), body))
                time.sleep(hook.delay)
                try:
                    self.send_response(hook.codes.pop(0) if hook.codes else 200)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:  # the client gave up waiting (the slow server's test)
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/{SECRET}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook():
    h = Hook()
    yield h
    h.close()


def down_url() -> str:
    """A port nobody listens on (bound, then closed): connections are refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/hooks/{SECRET}"


def quick(monkeypatch, give_up=1.0):
    monkeypatch.setattr(notify, "RETRIES", Backoff(first=0.05, cap=0.2, give_up_after=give_up))


def queue_with_job(tmp_path, tiny_config, webhook=None):
    queue = JobQueue(LocalStorage(str(tmp_path / "root")))
    config = validate_config({**tiny_config, "notify": {"webhook": webhook}})
    return queue, queue.submit(config)


def test_a_finished_job_is_told_to_the_config_and_the_worker_webhooks(tmp_path, tiny_config,
                                                                        hook):
    other = Hook()
    try:
        queue, manifest = queue_with_job(tmp_path, tiny_config, hook.url)
        worker = Worker(queue, WorkerIdentity("w1"), WorkerOptions(webhook=other.url),
                        trainer=fake_trainer([]))
        assert worker.run_once()
        worker.notifier.flush(10)
    finally:
        other.close()
    for h in (hook, other):
        assert len(h.posts) == 1
        path, headers, body = h.posts[0]
        assert path == f"/hooks/{SECRET}" and headers["Content-Type"] == "application/json"
        message = json.loads(body)
        # One body for Slack (text) and Discord (content; mentions off).
        assert manifest.job_id in message["text"] and "succeeded" in message["text"]
        assert message["content"] == message["text"]
        assert message["allowed_mentions"] == {"parse": []}
    assert queue.storage.exists(f"done/{manifest.job_id}/result.json")


def test_one_webhook_named_twice_gets_one_message(tmp_path, tiny_config, hook):
    queue, _ = queue_with_job(tmp_path, tiny_config, hook.url)
    worker = Worker(queue, WorkerIdentity("w1"), WorkerOptions(webhook=hook.url),
                    trainer=fake_trainer([]))
    worker.run_once()
    worker.notifier.flush(10)
    assert len(hook.posts) == 1


def test_a_job_handed_back_after_an_error_is_told(tmp_path, tiny_config, hook):
    def broken(run):
        raise ConnectionResetError("the data mount went away")

    queue, manifest = queue_with_job(tmp_path, tiny_config, hook.url)
    worker = Worker(queue, WorkerIdentity("w1"), trainer=broken)
    worker.run_once()
    worker.notifier.flush(10)
    assert worker.jobs_handed_back == 1 and len(hook.posts) == 1
    text = json.loads(hook.posts[0][2])["text"]
    assert manifest.job_id in text and "handed back" in text


def test_a_job_a_worker_ends_without_running_it_is_told(tmp_path, tiny_config, hook):
    """Cancelled while queued: the worker that meets it commits `cancelled` without a claim,
    and a crash loop ends as `failed` the same way; both are a job's end."""
    queue, manifest = queue_with_job(tmp_path, tiny_config, hook.url)
    queue.request_cancel(manifest.job_id)
    worker = Worker(queue, WorkerIdentity("w1"), trainer=fake_trainer([]))
    worker.run_once()
    worker.notifier.flush(10)
    assert len(hook.posts) == 1 and not queue.ended_unclaimed
    text = json.loads(hook.posts[0][2])["text"]
    assert manifest.job_id in text and "cancelled" in text


def test_a_down_server_neither_fails_nor_delays_the_job_and_the_url_is_not_logged(
        tmp_path, tiny_config, monkeypatch):
    quick(monkeypatch, give_up=1.5)
    url = down_url()
    queue, manifest = queue_with_job(tmp_path, tiny_config, url)
    worker = Worker(queue, WorkerIdentity("w1"), trainer=fake_trainer([]))
    with structlog.testing.capture_logs() as logs:
        started = time.monotonic()
        assert worker.run_once()
        took = time.monotonic() - started
        worker.notifier.flush(10)
        flushed = time.monotonic() - started
    assert took < 1.0  # the retries (1.5 s) run beside the worker, not in its way
    assert flushed < 5.0  # and they end, within their bound
    assert queue.storage.exists(f"done/{manifest.job_id}/result.json")
    warnings = [e for e in logs if e["event"].startswith("notification not sent")]
    assert len(warnings) == 1 and warnings[0]["host"] == "127.0.0.1"
    assert sum(e["event"].startswith("webhook not reached") for e in logs) >= 2  # it retried
    assert not [e for e in logs if SECRET in json.dumps(e, default=str)]


def test_a_server_error_is_retried_and_a_refusal_is_not(monkeypatch):
    quick(monkeypatch, give_up=5.0)
    flaky, refusing = Hook(codes=[503, 500]), Hook(codes=[404, 404])
    try:
        notifier = notify.Notifier([flaky.url, refusing.url])
        with structlog.testing.capture_logs() as logs:
            notifier.send("title", "hello")
            notifier.flush(10)
    finally:
        flaky.close()
        refusing.close()
    assert len(flaky.posts) == 3 and len(refusing.posts) == 1
    assert [e["error"] for e in logs if e["event"].startswith("notification not sent")] == \
        ["HTTP 404"]
    assert not [e for e in logs if SECRET in json.dumps(e, default=str)]


def test_a_slow_server_is_bounded(monkeypatch):
    monkeypatch.setattr(notify, "RETRIES", Backoff(first=0.05, cap=0.2, give_up_after=0.5))
    slow = Hook(delay=3.0)
    try:
        notifier = notify.Notifier([slow.url], try_seconds=0.3)
        started = time.monotonic()
        notifier.send("title", "hello")
        notifier.flush(10)
        assert time.monotonic() - started < 2.5
    finally:
        slow.close()


def test_ntfy_gets_plain_text_and_slack_gets_escaped_text():
    request = notify.request_for("https://ntfy.sh/my-topic", "job x <b> succeeded", "t")
    assert request.data == b"job x <b> succeeded" and request.get_header("Title") == "t"
    request = notify.request_for("https://hooks.slack.com/services/x", "a <!channel> & b", "t")
    body = json.loads(request.data)
    assert body["text"] == "a &lt;!channel&gt; &amp; b" and body["content"] == "a <!channel> & b"


@pytest.mark.parametrize("url", ["ftp://example.com/x", "example.com/hook", "http:///",
                                 "http://169.254.169.254/computeMetadata/v1/",
                                 "http://metadata.google.internal/x", "http://h:port/x"])
def test_a_config_webhook_must_be_an_http_url_and_the_error_hides_it(url, tiny_config):
    with pytest.raises(ConfigError) as e:
        validate_config({**tiny_config, "notify": {"webhook": url + SECRET}})
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith("notify.webhook:")
    assert SECRET not in str(e.value)


@pytest.mark.parametrize("bad", ["ftp://example.com/" + SECRET, "unreachable"])
def test_worker_webhook_bad_or_unreachable_is_one_line_and_exit_2(bad, tmp_path, capsys,
                                                                   monkeypatch):
    url = down_url() if bad == "unreachable" else bad
    (tmp_path / "root").mkdir()
    assert main(["worker", "--root", str(tmp_path / "root"), "--exit-when-idle",
                 "--webhook", url]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--webhook" in err and SECRET not in err
    monkeypatch.setenv("CHERRY_WEBHOOK", url)
    assert main(["worker", "--root", str(tmp_path / "root"), "--exit-when-idle"]) == 2
