"""toolplane.logfields: bound ids, the JSON and text lines, event names, masked secrets."""

from __future__ import annotations

import ast
import io
import json
import logging
import re
import sys
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from toolplane import logfields


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    stream = io.StringIO()
    handler = logfields.handler("json", stream)
    logger = logging.getLogger("toolplane.test_logfields")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream, handler
    logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_json_line_has_the_fields_and_the_bound_ids(capture) -> None:
    logger, stream, _ = capture
    with logfields.bound(run_id="run_1", tenant="tn_1"):
        with logfields.bound(node_id="n", job_id="run_1/n/1"):
            logger.info("job.dispatched tool=%s", "echo")
        logger.warning("receipt.invalid why=%s", "sig")
    logger.info("plain words")
    first, second, third = lines(stream)
    assert first["event"] == "job.dispatched"
    assert first["message"] == "job.dispatched tool=echo"
    assert first["level"] == "INFO" and first["logger"] == "toolplane.test_logfields"
    assert (first["run_id"], first["node_id"], first["job_id"], first["tenant"]) == (
        "run_1",
        "n",
        "run_1/n/1",
        "tn_1",
    )
    assert second["event"] == "receipt.invalid" and "node_id" not in second
    assert second["run_id"] == "run_1"
    assert "run_id" not in third and third["event"] == "toolplane.test_logfields"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(first["ts"]))
    assert datetime.fromisoformat(str(first["ts"])).utcoffset().total_seconds() == 0


def test_an_explicit_event_wins(capture) -> None:
    logger, stream, _ = capture
    logger.info("ingest.gave_up: after %s tries", 3, extra={"event": "ingest.abandoned"})
    logger.info("ingest.gave_up: after %s tries", 3)
    assert [x["event"] for x in lines(stream)] == ["ingest.abandoned", "ingest.gave_up"]


def test_the_traceback_is_one_string_field(capture) -> None:
    logger, stream, _ = capture
    try:
        raise RuntimeError("boom at postgresql://app:hunter2@db/x")
    except RuntimeError:
        logger.exception("sweep.failed")
    (line,) = lines(stream)  # one line, a traceback inside
    assert "Traceback" in str(line["exc_info"]) and "RuntimeError" in str(line["exc_info"])
    assert "hunter2" not in stream.getvalue()


def test_the_trace_id_hook_and_unknown_fields() -> None:
    token = logfields.bind(trace_id="4bf92f3577b34da6a3ce929d0e0e4736")
    try:
        assert logfields.current()["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    finally:
        logfields.unbind(token)
    assert "trace_id" not in logfields.current()
    with pytest.raises(ValueError, match="password"):
        logfields.bind(password="x")


def test_ids_do_not_leak_between_threads(capture) -> None:
    logger, stream, _ = capture
    inside = threading.Event()
    done = threading.Event()

    def other() -> None:
        inside.wait(5)
        logger.info("thread.line")
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with logfields.bound(run_id="run_mine"):
        inside.set()
        done.wait(5)
    thread.join(5)
    assert "run_id" not in lines(stream)[0]


@pytest.mark.parametrize(
    ("secret_text", "secret"),
    [
        ("connect postgresql+psycopg://toolplane:s3cretPW@db:5432/tp", "s3cretPW"),
        ("broker redis://worker-x:Zm9vYmFy@127.0.0.1:6379/0", "Zm9vYmFy"),
        ("token tp_AbCdEf0123456789_-xyzXYZ issued", "AbCdEf0123456789"),
        ("Authorization: Bearer abc.def-ghi", "abc.def-ghi"),
        ("FLOWER password=letmein now", "letmein"),
    ],
)
def test_secrets_never_reach_a_line(capture, secret_text: str, secret: str) -> None:
    logger, stream, _ = capture
    logger.error("api.problem %s", secret_text)
    text_stream = io.StringIO()
    text_handler = logfields.handler("text", text_stream)
    logger.addHandler(text_handler)
    try:
        logger.error("api.problem %s", secret_text)
    finally:
        logger.removeHandler(text_handler)
    assert secret not in stream.getvalue()
    assert secret not in text_stream.getvalue()
    assert "***" in text_stream.getvalue()


def test_text_is_the_classic_line() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("toolplane.test_text")
    handler = logfields.handler("text", stream)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with logfields.bound(run_id="run_1"):
            logger.warning("job.refused code=%s", "replay")
    finally:
        logger.removeHandler(handler)
    line = stream.getvalue().rstrip("\n")
    pattern = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING toolplane\.test_text job\.refused code=replay"
    assert re.fullmatch(pattern, line), line


@pytest.mark.parametrize("value", ["xml", "", "JSONL"])
def test_a_bad_format_names_the_option(value: str) -> None:
    if value == "":
        assert logfields.check_format(value) == "text"  # unset: the default
        return
    with pytest.raises(ValueError, match=r"^--log-format: .* is not one of text, json$"):
        logfields.check_format(value)
    assert logfields.check_format("JSON") == "json"


def test_setup_routes_every_line_through_one_handler() -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, sys.excepthook)
    stream = io.StringIO()
    try:
        logfields.setup("INFO", "json", stream)
        logging.getLogger("uvicorn.error").addHandler(logging.StreamHandler(io.StringIO()))
        logfields.setup("INFO", "json", stream)  # again, as Celery's pool children do
        logging.getLogger("uvicorn.error").info("Started server process")
        logging.getLogger("celery.app.trace").info("Task x succeeded")
        assert [x["logger"] for x in lines(stream)] == ["uvicorn.error", "celery.app.trace"]
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        sys.excepthook = saved[2]
        logging.captureWarnings(False)


def test_every_log_call_of_ours_starts_with_a_dotted_event_name() -> None:
    """``log.info("job.start job=%s", ...)``: the first word of each message is its event."""
    root = Path(__file__).resolve().parents[2]
    levels = {"debug", "info", "warning", "error", "exception", "critical"}
    unnamed = []
    for package in ("control", "sandbox_tasks", "ledger", "toolplane", "policy"):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in levels
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id in {"log", "logger"}
                ):
                    continue
                first = node.args[0] if node.args else None
                given = any(k.arg == "extra" for k in node.keywords)
                text = first.value if isinstance(first, ast.Constant) else None
                record = logging.LogRecord("x", 20, "", 0, text or "", None, None)
                if not given and (text is None or logfields.event_of(record) == "x"):
                    unnamed.append(f"{path.relative_to(root)}:{node.lineno}")
    assert unnamed == []


def test_binding_a_run_binds_its_trace() -> None:
    """A run's trace id follows from its id, so every process's lines of the run name the
    trace its spans are in (toolplane.tracecontext.run_trace)."""
    from toolplane.tracecontext import run_trace

    with logfields.bound(run_id="run_abc"):
        assert logfields.current()["trace_id"] == run_trace("run_abc").trace_id
        with logfields.bound(run_id="run_def"):
            assert logfields.current()["trace_id"] == run_trace("run_def").trace_id
    with logfields.bound(run_id="run_abc", trace_id="4bf92f3577b34da6a3ce929d0e0e4736"):
        assert logfields.current()["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert "trace_id" not in logfields.current()


@pytest.mark.parametrize(
    ("line", "secret"),
    [
        ("broker redis://tool:p/ss@w0rd@redis:6379/0 down", "p/ss@w0rd"),  # / and @ unencoded
        ("database postgresql://app:hunter2@db/x and http://u:pw2@proxy/", "hunter2"),
        ("database postgresql://app:hunter2@db/x and http://u:pw2@proxy/", "pw2"),
        ("redis://:only-a-password@redis:6379", "only-a-password"),
        ("Authorization: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
        ("collector headers api-key=k3y, x=1", "k3y"),
        ("OTEL headers API_KEY=k4y", "k4y"),
        ("passwd=s3cret&user=x", "s3cret"),
    ],
)
def test_credentials_are_masked_wherever_they_stand(line: str, secret: str) -> None:
    assert secret not in logfields.redact(line)


def test_masking_keeps_what_is_no_credential() -> None:
    line = "mail a@b.c and http://host/path@x and redis://redis:6379/0"
    assert logfields.redact(line) == line
