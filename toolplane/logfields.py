"""Structured logs for every process of both planes: ids bound to the context, two formats.

``bound(run_id=..., node_id=..., job_id=..., tenant=...)`` binds ids to the current context
(a contextvar, so threads and tasks keep their own); every record logged inside carries
them. ``setup(level, fmt)`` installs one handler on the root logger: ``text`` is the classic
``asctime level logger message`` line, ``json`` one object per line with ``ts`` (RFC 3339,
UTC), ``level``, ``logger``, ``event``, ``message``, the bound ids and ``exc_info``.

``event`` is a dotted name: ``extra={"event": "job.dispatched"}``, else the message's first
word where it is dotted (``"job.start job=..."``), else the logger's name (other libraries).

``trace_id`` comes with ``run_id``: a run's trace id follows from its id
(``toolplane.tracecontext.run_trace``), so binding a run binds its trace, in every process.

Secrets never reach a line: passwords in URLs, API tokens (``tp_...``) and bearer
credentials are masked in the message and the traceback, in both formats.

Shared by both planes: imports nothing of ``control``, ``ledger`` or ``sandbox_tasks``.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import IO, Any

from toolplane.tracecontext import run_trace

FORMATS = ("text", "json")
FIELDS = ("run_id", "node_id", "job_id", "tenant", "trace_id")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
ENV_NAME = "TOOLPLANE_LOG_FORMAT"

_ids: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("toolplane_log_ids")
_EVENT = re.compile(r"^([a-z][a-z0-9_]*(?:\.[a-z0-9_]+)+):?(?:\s|$)")
_SECRETS = (
    # URL password, up to the last @ of the authority (a password may hold / or @ unencoded)
    (
        re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s/:@]*:)[^\s]*@(?=[^\s@/]*(?:[/\s]|$))"),
        r"\1***@",
    ),
    (re.compile(r"\btp_[A-Za-z0-9_-]{8,}"), "tp_***"),  # API tokens (control.governance.auth)
    (re.compile(r"(?i)\b((?:bearer|basic)\s+)[A-Za-z0-9._~+/=-]+"), r"\1***"),
    (re.compile(r"(?i)\b((?:password|passwd|secret|token|api[-_]?key)=)[^\s&,;]+"), r"\1***"),
)
# What could end a line or drive a terminal: C0 and C1 controls, DEL, Unicode line and
# paragraph separators (str.splitlines splits at all of them).
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")

__all__ = [
    "ENV_NAME",
    "FIELDS",
    "FORMATS",
    "IdsFilter",
    "JsonFormatter",
    "TextFormatter",
    "bind",
    "bound",
    "check_format",
    "current",
    "escape_controls",
    "event_of",
    "handler",
    "redact",
    "route_celery",
    "setup",
    "unbind",
]


def current() -> dict[str, str]:
    """The ids bound in this context (a copy)."""
    return dict(_ids.get({}))


def bind(**ids: object) -> contextvars.Token[dict[str, str]]:
    """Bind ids (of FIELDS; None leaves one as it is) until ``unbind(token)``.

    Binding ``run_id`` binds that run's ``trace_id`` too (unless given): the id of the
    trace its spans are in when tracing is on (``toolplane.tracecontext.run_trace``)."""
    unknown = set(ids) - set(FIELDS)
    if unknown:
        raise ValueError(f"not a log field: {', '.join(sorted(unknown))} (known: {FIELDS})")
    merged = {**_ids.get({}), **{k: str(v) for k, v in ids.items() if v is not None}}
    run_id = ids.get("run_id")
    if isinstance(run_id, str) and run_id and ids.get("trace_id") is None:
        # a run's trace id follows from its id (toolplane.tracecontext.run_trace): the
        # trace the run's spans are in when tracing is on, the same in every process
        merged["trace_id"] = run_trace(run_id).trace_id
    return _ids.set(merged)


def unbind(token: contextvars.Token[dict[str, str]]) -> None:
    _ids.reset(token)


@contextlib.contextmanager
def bound(**ids: object) -> Iterator[None]:
    """``with bound(run_id=r, node_id=n):`` every line logged inside carries the ids."""
    token = bind(**ids)
    try:
        yield
    finally:
        _ids.reset(token)


def redact(text: str) -> str:
    """``text`` with passwords in URLs, tokens and bearer credentials masked."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def event_of(record: logging.LogRecord) -> str:
    """The record's dotted event name (see the module's doc)."""
    given = getattr(record, "event", None)
    if isinstance(given, str) and given:
        return given
    found = _EVENT.match(str(record.msg))
    return found[1] if found else record.name


class IdsFilter(logging.Filter):
    """Copies the bound ids onto each record (``record.run_id`` ...), for any formatter."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in _ids.get({}).items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


def escape_controls(text: str) -> str:
    """``text`` with every control character and line separator written as its escape
    (``\\n``, ``\\x1b``, ``\\u2028``): what a tool controls (its stderr, the names of
    the files it left) never starts a line of its own nor moves a terminal's cursor."""
    return _CONTROLS.sub(lambda m: m[0].encode("unicode_escape").decode("ascii"), text)


def _json_escape_controls(text: str) -> str:
    # json.dumps(ensure_ascii=False) leaves DEL, C1 controls and U+2028/9 as they are
    return _CONTROLS.sub(lambda m: f"\\u{ord(m[0]):04x}", text)


class TextFormatter(logging.Formatter):
    """The classic line, secrets masked; the message on that one line (its control
    characters escaped); a traceback, if any, on the lines after it."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - the base's name
        one = logging.makeLogRecord(record.__dict__)
        one.message = escape_controls(record.message)
        return super().formatMessage(one)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line (no newline inside: tracebacks are a string field)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC)
        line: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "event": event_of(record),
            "message": redact(record.getMessage()),
        }
        ids = _ids.get({})
        for name in FIELDS:
            value = getattr(record, name, None) or ids.get(name)
            if value is not None:
                line[name] = str(value)
        if record.exc_info:
            line["exc_info"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            line["exc_info"] = redact(record.exc_text)
        if record.stack_info:
            line["stack_info"] = redact(record.stack_info)
        return _json_escape_controls(json.dumps(line, ensure_ascii=False, default=str))


def check_format(value: str | None, *, option: str = "--log-format") -> str:
    """``value`` (default: text) if it is a format, else ValueError naming the option."""
    fmt = (value or "text").strip().lower()
    if fmt not in FORMATS:
        raise ValueError(f"{option}: {value!r} is not one of {', '.join(FORMATS)}")
    return fmt


def handler(fmt: str, stream: IO[str] | None = None) -> logging.Handler:
    """A stream handler (stderr by default) in ``fmt``, with the ids filter."""
    out = logging.StreamHandler(stream or sys.stderr)
    out.setFormatter(JsonFormatter() if check_format(fmt) == "json" else TextFormatter())
    out.addFilter(IdsFilter())
    return out


def setup(level: str | int, fmt: str, stream: IO[str] | None = None) -> None:
    """The root logger's one handler in ``fmt``; loggers that carry their own handlers and
    do not propagate (uvicorn's, celery's) are routed to it, so every line has one format."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler(fmt, stream))
    root.setLevel(level if isinstance(level, int) else level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    if check_format(fmt) == "json":  # nothing else may write a line that is not JSON
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught


def _log_uncaught(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    logging.getLogger("toolplane").critical(
        "process.crashed %s: %s", kind.__name__, value, exc_info=(kind, value, tb)
    )


def route_celery(fmt: str) -> None:
    """In ``json``, Celery's own logging set-up (which a worker's main process and each pool
    child run) installs this module's handler instead of Celery's: its lines come out as JSON
    too. In ``text`` Celery does as it always did."""
    if check_format(fmt) != "json":
        return
    from celery import signals

    root = logging.getLogger()

    def _setup(loglevel: object = None, **_: object) -> None:
        level = loglevel if isinstance(loglevel, int | str) and loglevel else root.level
        setup(level, "json")

    signals.setup_logging.connect(_setup, weak=False)
