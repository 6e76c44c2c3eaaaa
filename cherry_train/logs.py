"""structlog set-up: JSON lines for the worker (machines read them), readable for people."""

from __future__ import annotations

import json
import logging
import sys
import threading

import structlog

# job id -> the JSON lines logged for it in this process (see job_log_tap).
_taps: dict[str, list[str]] = {}
_taps_lock = threading.Lock()


def brief(exc: BaseException, limit: int = 300) -> str:
    """An error in one log field: its type and the start of its message."""
    return f"{type(exc).__name__}: {str(exc)[:limit]}"


def open_tap(job_id: str) -> list[str]:
    """Start collecting this job's log events; the list grows as they are logged."""
    with _taps_lock:
        return _taps.setdefault(job_id, [])


def close_tap(job_id: str) -> None:
    with _taps_lock:
        _taps.pop(job_id, None)


def job_log_tap(logger, method_name, event_dict):
    """A processor: every event carrying a tapped job's id is kept, as a JSON line, for that
    job's done/<job_id>/worker.log (the reporter syncs it at each heartbeat)."""
    lines = _taps.get(event_dict.get("job_id"))
    if lines is not None:
        lines.append(json.dumps(event_dict, default=str, separators=(",", ":")))
    return event_dict


def _drop_below(min_level: int):
    levels = logging.getLevelNamesMapping()

    def processor(logger, method_name, event_dict):
        if levels.get(str(event_dict.get("level", "info")).upper(), logging.INFO) < min_level:
            raise structlog.DropEvent
        return event_dict
    return processor


class _BarSafeLogger(structlog.PrintLogger):
    """Prints above any tqdm progress bar on the screen instead of into it (tqdm.write clears
    the bars, prints, and draws them again)."""

    def msg(self, message: str) -> None:
        tqdm = sys.modules.get("tqdm")
        bars = getattr(getattr(tqdm, "tqdm", None), "_instances", None)
        if bars:
            tqdm.tqdm.write(message, file=self._file)
        else:
            super().msg(message)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg
    failure = msg


def resolve_format(fmt: str) -> str:
    """auto: readable lines for a person at a terminal, JSON lines for whatever reads a pipe."""
    if fmt != "auto":
        return fmt
    return "console" if sys.stderr.isatty() else "json"


def configure(fmt: str = "console", level: str = "info") -> None:
    fmt = resolve_format(fmt)
    renderer = (structlog.processors.JSONRenderer() if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    # Tracebacks become data before the tap, so a job's worker.log keeps them too.
    processors.append(structlog.processors.dict_tracebacks if fmt == "json"
                      else structlog.processors.format_exc_info)
    # A job's worker.log keeps its info events whatever the console shows: filter after the tap.
    console_level = logging.getLevelNamesMapping()[level.upper()]
    processors += [job_log_tap, _drop_below(console_level), renderer]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(min(console_level, logging.INFO)),
        # Looked up per logger, not bound once: sys.stderr may be replaced (notebooks, tests).
        logger_factory=lambda *args: _BarSafeLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )
