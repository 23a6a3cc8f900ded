"""Attacks on the observability of the stack: the control's ``/metrics`` reached by other
paths, methods or tokens; the worker's metrics endpoint held by an idle client; log lines
forged from what a tool controls (its stderr, the names of files it leaves behind)."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy.engine import make_url

from sandbox_tasks import metrics as metrics_module
from sandbox_tasks.metrics import WorkerMetrics, serve_metrics
from tests.harness import Services, Stack, own_services, start_stack, stop_stack, wait_for
from tests.integration.govern import operator_admin
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from toolplane import logfields
from toolplane.tracecontext import Traceparent, run_trace

METRICS_TEXT = "toolplane_outbox_backlog"


def raw(stack: Stack, method: str, path: str, token: str | None) -> tuple[int, str]:
    """One request with ``path`` sent exactly as given (no client-side normalisation)."""
    url = urlsplit(stack.url)
    connection = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=30)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


def issue(stack: Stack, admin: str, principal: str, role: str) -> tuple[str, str]:
    done = httpx.post(
        stack.url + "/v1/tokens",
        json={"principal": principal, "role": role},
        headers={"Authorization": f"Bearer {admin}"},
        timeout=30,
    )
    assert done.status_code == 201, done.text
    return str(done.json()["token_id"]), str(done.json()["token"])


@pytest.mark.integration
def test_no_path_method_or_token_variant_reads_the_metrics(stack: Stack) -> None:
    operator = operator_admin(stack)
    assert METRICS_TEXT in raw(stack, "GET", "/metrics", operator)[1]  # the attack can work
    _, submitter = issue(stack, operator, "obs-attack-submitter", "submitter")
    paths = [
        "/metrics/",
        "//metrics",
        "/v1/../metrics",
        "/./metrics",
        "/v1/metrics",
        "/METRICS",
        "/Metrics",
        "/%6detrics",
        "/metrics%2f",
        "/metrics;x",
        "/metrics#x",
        "/metrics?x=1",
        f"/metrics?token={operator}",
        f"/metrics?access_token={operator}",
        f"/metrics?authorization=Bearer%20{operator}",
    ]
    for token in (None, stack.tenant(), submitter):
        for path in paths:
            for method in ("GET", "HEAD", "OPTIONS", "POST"):
                status, body = raw(stack, method, path, token)
                assert METRICS_TEXT not in body, (method, path, status)
                assert status != 200 or method == "OPTIONS" and not body, (method, path, status)


@pytest.mark.integration
def test_a_revoked_operator_admin_token_reads_no_metrics(stack: Stack) -> None:
    operator = operator_admin(stack)
    token_id, second = issue(stack, operator, "obs-attack-admin", "admin")
    assert raw(stack, "GET", "/metrics", second)[0] == 200
    revoked = httpx.delete(
        f"{stack.url}/v1/tokens/{token_id}",
        headers={"Authorization": f"Bearer {operator}"},
        timeout=30,
    )
    assert revoked.status_code == 204, revoked.text
    status, body = raw(stack, "GET", "/metrics", second)
    assert status == 401 and METRICS_TEXT not in body, (status, body)


@pytest.mark.integration
def test_an_expired_operator_admin_token_reads_no_metrics(stack: Stack) -> None:
    operator = operator_admin(stack)
    done = httpx.post(
        stack.url + "/v1/tokens",
        json={"principal": "obs-attack-brief", "role": "admin", "expires_in_s": 5},
        headers={"Authorization": f"Bearer {operator}"},
        timeout=30,
    )
    assert done.status_code == 201, done.text
    brief = str(done.json()["token"])
    assert raw(stack, "GET", "/metrics", brief)[0] == 200
    wait_for(lambda: raw(stack, "GET", "/metrics", brief)[0] == 401, timeout=30)
    status, body = raw(stack, "GET", "/metrics", brief)
    assert status == 401 and METRICS_TEXT not in body, (status, body)


@pytest.fixture
def worker_endpoint(tmp_path: Path) -> Iterator[tuple[str, int, bytes]]:
    token = b"s3cret-worker-metrics-token"
    (tmp_path / "token").write_bytes(token)
    with socket.socket() as probe:  # a free port (the setting takes no port 0)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = serve_metrics(WorkerMetrics("read_repo_file"), f"127.0.0.1:{port}", tmp_path / "token")
    try:
        yield "127.0.0.1", server.server_port, token
    finally:
        server.shutdown()
        server.server_close()


def scrape(host: str, port: int, token: bytes, timeout: float) -> int:
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", "/metrics", headers={"Authorization": f"Bearer {token.decode()}"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def test_an_idle_client_does_not_stop_the_worker_endpoint(
    worker_endpoint: tuple[str, int, bytes],
) -> None:
    """Any local process (a tool of a plain runner, another user) may connect to the worker's
    endpoint and send nothing, or half a request: Prometheus's scrape must still be answered."""
    host, port, token = worker_endpoint
    assert scrape(host, port, token, timeout=10) == 200
    idle = socket.create_connection((host, port))
    half = socket.create_connection((host, port))
    half.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    try:
        started = time.monotonic()
        assert scrape(host, port, token, timeout=30) == 200
        assert time.monotonic() - started < 30
    finally:
        idle.close()
        half.close()


def test_slow_clients_holding_every_slot_are_cut_off(
    worker_endpoint: tuple[str, int, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clients that send a byte now and then never time a read out: each request has a
    deadline for its whole life, so the endpoint answers again once it passed."""
    monkeypatch.setattr(metrics_module, "CLIENT_TIMEOUT_S", 2.0)
    host, port, token = worker_endpoint
    stop = threading.Event()
    slow = [socket.create_connection((host, port)) for _ in range(metrics_module.MAX_CLIENTS)]

    def trickle() -> None:
        for _ in range(40):  # 20 s of "GET /metrics HTTP/1.1\r\nX: aaaa..." at 2 bytes/s
            for connection in slow:
                with contextlib.suppress(OSError):
                    connection.sendall(b"G" if _ == 0 else b"a")
            if stop.wait(0.5):
                return

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    started = time.monotonic()

    def answered() -> bool:
        try:
            return scrape(host, port, token, timeout=1) == 200
        except (OSError, http.client.HTTPException):
            return False  # every slot is held: this connection was closed at once

    try:
        wait_for(answered, timeout=10, what="a scrape while slow clients hold every slot")
        assert time.monotonic() - started < 10
    finally:
        stop.set()
        thread.join(timeout=5)
        for connection in slow:
            connection.close()


def test_the_worker_endpoint_refuses_a_wrong_or_huge_token(
    worker_endpoint: tuple[str, int, bytes],
) -> None:
    host, port, token = worker_endpoint
    assert scrape(host, port, token + b"x", timeout=10) == 401
    assert scrape(host, port, token[:-1], timeout=10) == 401
    assert scrape(host, port, b"x" * 60_000, timeout=10) in (400, 401, 431)
    assert scrape(host, port, token, timeout=10) == 200  # still serving


def test_a_bind_that_cannot_be_served_is_a_settings_error(tmp_path: Path) -> None:
    """A port in use or a host that does not resolve: an error naming the setting, not a
    traceback; an IPv6 address (``[::1]:port``) is served."""
    from toolplane.errors import SettingsError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for bind in (f"127.0.0.1:{port}", "no-such-host.invalid:9808"):
            with pytest.raises(SettingsError) as info:
                serve_metrics(WorkerMetrics("read_repo_file"), bind, None)
            assert info.value.setting == "WORKER_METRICS_BIND" and bind in str(info.value)
    if not socket.has_ipv6:
        return
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            return  # no IPv6 loopback here
        port = probe.getsockname()[1]
    server = serve_metrics(WorkerMetrics("read_repo_file"), f"[::1]:{port}", None)
    try:
        assert scrape("::1", port, b"", timeout=10) == 200
    finally:
        server.shutdown()
        server.server_close()


FORGED = "2026-12-08 00:00:00,000 WARNING toolplane.control run.completed run_id=victim status=ok"
JSON_FORGED = '{"ts":"2026-12-08T00:00:00.000Z","level":"INFO","logger":"toolplane.control"}'


def lines(fmt: str, message: str, *args: object) -> list[str]:
    out = io.StringIO()
    logger = logging.getLogger("toolplane.test_observability_attacks")
    handler = logfields.handler(fmt, out)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning(message, *args)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    return out.getvalue().splitlines()


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize(
    "hostile",
    [
        f"x\n{FORGED}",  # a file name the tool left behind (runners: 'the call left files')
        f"x\r{FORGED}",  # a carriage return: a terminal shows the forged line instead
        f"x\x1b[2K\x1b[1G{FORGED}",  # erase the line, back to its start, then the forgery
        f"x\u2028{JSON_FORGED}",  # Unicode line separators that str.splitlines() splits at
        f"x\x85{JSON_FORGED}",
        f"x\x0b{JSON_FORGED}",
    ],
)
def test_a_tool_controlled_string_stays_inside_one_line(fmt: str, hostile: str) -> None:
    """What a tool controls is logged with %s (its stderr, the names of the files it left):
    it never starts a line of its own, nor carries a control character that a terminal acts
    on, in either format."""
    found = lines(fmt, "sandbox.replaced tool=%s reason=the call left files: %s", "t", hostile)
    assert len(found) == 1, found
    assert all(not (c < " " or "\x7f" <= c <= "\x9f" or c in "\u2028\u2029") for c in found[0])
    assert "sandbox.replaced" in found[0]
    if fmt == "json":  # the string itself is kept, escaped
        assert hostile in json.loads(found[0])["message"]


class Captured(logging.Handler):
    """The lines of a logger as a worker writes them in the text format (Celery leaves the
    root logger's handler to the worker: celeryconfig's worker_hijack_root_logger)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.setFormatter(logfields.TextFormatter())
        self.out: list[str] = []
        self.logger = logging.getLogger(name)

    def emit(self, record: logging.LogRecord) -> None:
        self.out.append(self.format(record))

    def __enter__(self) -> Captured:
        self.logger.addHandler(self)
        return self

    def __exit__(self, *_: object) -> None:
        self.logger.removeHandler(self)

    def lines(self) -> list[str]:
        return "\n".join(self.out).splitlines()


def test_a_file_name_left_by_a_tool_forges_no_worker_log_line(tmp_path: Path) -> None:
    """A tool names a file it leaves in its scratch root; the runner reports it, and the
    worker logs why it replaced the runner: in the text format (the default), that name must
    not start a line of its own."""
    from sandbox_tasks.plain import PlainExecutor
    from sandbox_tasks.registry import ToolContext
    from tests.harness import REPO
    from tests.takeover_tools import TOOLS

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    roots = {"repo": REPO / "examples" / "repo", "docs": REPO / "examples" / "docs"}
    executor = PlainExecutor(
        spec=TOOLS[0], roots=roots, extra_modules=["tests.takeover_tools"], scratch_root=scratch
    )
    ctx = ToolContext(repo_root=REPO, docs_root=REPO, scratch_dir=Path("/nonexistent"))
    args = TOOLS[0].args_model.model_validate({"action": "echo", "target": ""})
    try:
        assert executor.run(TOOLS[0], args, ctx, tenant="t1").ok
        sandbox = executor._runners["t1"]
        assert sandbox.scratch is not None
        (sandbox.scratch / f"x\n{FORGED}").write_text("")  # as the tool would
        with Captured("toolplane.sandbox") as captured:
            assert executor.run(TOOLS[0], args, ctx, tenant="t1").ok
        assert executor.replaced == 1  # the runner was replaced, and said why
    finally:
        executor.close()
    found = captured.lines()
    assert any("left files" in line for line in found), found
    assert not any(line.startswith(FORGED) for line in found), found
    assert all("\r" not in line and "\x1b" not in line for line in found), found


def test_the_stderr_relay_keeps_a_forged_line_inside_its_own() -> None:
    """A runner's stderr is relayed line by line; a carriage return or an escape sequence in
    a line cannot make it read as another process's (in the text format)."""
    from sandbox_tasks.sandbox import _relay

    read, write = os.pipe()
    with os.fdopen(write, "wb") as w:
        w.write(f"boom\r{FORGED}\n\x1b[2K{FORGED}\n".encode())
    with Captured("toolplane.sandbox") as captured:
        _relay(os.fdopen(read, "rb"), "t")
    found = captured.lines()
    assert len(found) == 2, found
    for line in found:
        assert "sandbox.stderr tool=t line=" in line
        assert "\r" not in line and "\x1b" not in line, line


@pytest.mark.integration
def test_an_unverified_result_forges_no_line_in_the_controls_log(stack: Stack) -> None:
    """Any worker may write to ``results``; the control logs the run and node ids that an
    unverified message claims. Newlines in them must not forge the control's log lines."""
    from celery import Celery

    import celeryconfig

    marker = secrets.token_hex(6)
    forged = f"{FORGED} forged={marker}"
    app = Celery("mallory", set_as_current=False)
    app.conf.update(celeryconfig.build_config(stack.services.redis_url))
    app.send_task(
        celeryconfig.INGEST_TASK,
        args=[{"result": {"run_id": f"run_x\n{forged}", "node_id": f"n\r\x1b[2K{forged}"}}],
        queue=celeryconfig.RESULTS_QUEUE,
    )
    wait_for(lambda: stack.log("control").count(marker) >= 2, timeout=30, what="its line")
    for line in stack.log("control").splitlines():
        if marker in line:
            assert "receipt.invalid" in line, line
            assert "\r" not in line and "\x1b" not in line, line


TRACED_TOOL = "read_repo_file"


@dataclass(frozen=True)
class Traced:
    stack: Stack
    receiver: OtlpReceiver
    password: str  # in the collector's URL


@pytest.fixture(scope="module")
def traced(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    """A stack of its own (text logs, the default) exporting its spans to a real receiver,
    whose URL carries a password."""
    password = "otlp-" + secrets.token_hex(8)
    receiver = OtlpReceiver()
    own = own_services(services)
    endpoint = receiver.endpoint.replace("http://", f"http://collector:{password}@")
    extra = {"TOOLPLANE_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    try:
        home = Path(tmp_path_factory.mktemp("traced-text"))
        stack = start_stack(own, home, workers={TRACED_TOOL: 1}, extra_env=extra)
        try:
            yield Traced(stack, receiver, password)
        finally:
            stop_stack(stack)
    finally:
        own.close()
        receiver.close()


@pytest.mark.integration
def test_no_secret_reaches_the_text_logs_of_any_process(traced: Traced) -> None:
    """The default (text) format masks secrets in every process's log as JSON does: in the
    control daemon and the workers too, where Celery runs. Here the collector's URL carries
    a password, which each process's ``tracing.on`` line names."""
    stack = traced.stack
    token = stack.tenant()
    with stack.http(token) as client:
        run = client.call(TRACED_TOOL, {"path": "README.md"}, wait=True, timeout=60)
    wait_for(lambda: traced.receiver.where(run_id=run.run_id), timeout=30)  # tracing is on
    runtime_password = make_url(stack.runtime_url).password
    assert runtime_password, "the control's database URL carries a password"
    for name in ("api", "control", f"worker-{TRACED_TOOL}"):
        text = stack.log(name)
        assert "tracing.on" in text, f"{name}.log: the line that names the endpoint"
        for secret in (traced.password, token, str(runtime_password)):
            assert secret not in text, f"{name}.log shows a secret"


@pytest.mark.integration
def test_a_callers_traceparent_puts_no_span_of_the_api_in_another_runs_trace(
    traced: Traced,
) -> None:
    """A caller sends a W3C ``traceparent`` header naming the trace of a run (derived from
    its id, so anyone who learns the id can name it): the API's spans of that request are
    not children of it. A run's trace holds its own stages, nothing a caller put there."""
    stack, receiver = traced.stack, traced.receiver
    with stack.http(stack.tenant()) as victim_client:
        victim = victim_client.call(TRACED_TOOL, {"path": "README.md"}, wait=True, timeout=60)
    ids = run_trace(victim.run_id)
    wait_for(lambda: receiver.of_trace(ids.trace_id), timeout=30)
    header = {"traceparent": str(Traceparent(ids.trace_id, ids.span_id))}
    marker = secrets.token_hex(6)
    attacker = stack.tenant()
    for path in (f"/v1/nothing-{marker}", f"/v1/runs/run_{marker}"):
        httpx.get(stack.url + path, headers={**header, "Authorization": f"Bearer {attacker}"})
    submitted = httpx.post(
        stack.url + "/v1/calls",
        json={"tool": TRACED_TOOL, "args": {"path": "README.md"}},
        headers={**header, "Authorization": f"Bearer {attacker}"},
        timeout=30,
    )
    assert submitted.status_code in (200, 201, 202), submitted.text

    def request_spans() -> list[ReceivedSpan]:
        return [s for s in receiver.spans if marker in str(s.attributes.get("url.path", ""))]

    wait_for(lambda: len(request_spans()) >= 2, timeout=30, what="the API's request spans")
    wait_for(lambda: receiver.where(run_id=submitted.json()["run_id"]), timeout=30)
    assert all(s.trace_id != ids.trace_id for s in request_spans())
    strangers = [
        (s.service, s.name, s.attributes.get("url.path"))
        for s in receiver.of_trace(ids.trace_id)
        if s.attributes.get("toolplane.run_id") != victim.run_id
    ]
    assert strangers == [], strangers
