"""The broker screen's rules (its effect on a running control: tests/integration)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

from control.broker.screen import envelope_problem


def envelope(**over: object) -> bytes:
    message = {
        "body": base64.b64encode(b"[[], {}, {}]").decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"task": "control.ingest_result", "id": "x"},
        "properties": {
            "body_encoding": "base64",
            "delivery_tag": "t",
            "delivery_info": {"exchange": "", "routing_key": "results"},
        },
    }
    message.update(over)
    return json.dumps(message).encode()


def test_a_kombu_message_passes_and_each_rule_names_itself() -> None:
    assert envelope_problem(envelope()) is None
    assert envelope_problem(envelope(body="")) is None  # kombu sends an empty body as is
    assert envelope_problem(b"\xff") == "not UTF-8"
    assert envelope_problem(b"{").startswith("not JSON (")
    assert envelope_problem(b"[" * 5000 + b"]" * 5000) == "JSON nested too deep"
    assert envelope_problem(b"null") == "not a JSON object (NoneType)"
    assert envelope_problem(envelope(properties=[])) == "properties: not an object"
    bare = envelope(properties={"delivery_tag": "t"})
    assert envelope_problem(bare) == "properties.delivery_info: not an object"
    routed = {"exchange": "", "routing_key": "results"}
    assert envelope_problem(envelope(), "results") is None
    assert envelope_problem(envelope(), "tool.x") == (
        "properties.delivery_info: routed to ''/'results', not 'tool.x'"
    )
    typed = envelope(headers={"z": {"__type__": "nope", "__value__": 1}})
    assert envelope_problem(typed).startswith("not kombu's JSON (ValueError:")
    tag = envelope(properties={"delivery_tag": 1})
    assert envelope_problem(tag) == "properties.delivery_tag: not a non-empty string"
    info = envelope(properties={"delivery_tag": "t", "delivery_info": "x"})
    assert envelope_problem(info) == "properties.delivery_info: not an object"
    zipped = envelope(
        properties={"delivery_tag": "t", "delivery_info": routed, "body_encoding": "zlib"}
    )
    assert envelope_problem(zipped) == "properties.body_encoding: 'zlib' is not base64"
    assert envelope_problem(envelope(headers="x")) == "headers: not an object"
    assert envelope_problem(envelope(**{"content-type": 1})) == "content-type: not a string"
    assert envelope_problem(envelope(body=3)) == "body: not a string"
    assert envelope_problem(envelope(body="a b")) == "body: not base64"


PROBE = """
import json, sys
from celery import Celery
from control.broker import screen as broker_screen

broker_screen.install(keep=sys.argv[1] == "keep")
out = {}
for url in sys.argv[2:]:
    app = Celery("t", set_as_current=False)
    app.conf.broker_url = url
    c = app.connection_for_read()
    out[url] = [type(c.transport).__name__, c.as_uri().split("://")[0], repr(c.ssl)]
try:
    broker_screen.install()
    out["again"] = "installed"
except RuntimeError as e:
    out["again"] = str(e)
print(json.dumps(out))
"""


def probe(keep: str, *urls: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, keep, *urls],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    return json.loads(done.stdout)


def test_install_screens_redis_urls_and_leaves_them_kombus() -> None:
    redis_url = "redis://u:p@127.0.0.1:6379/1"
    verified = "rediss://h:6380/0?ssl_cert_reqs=required"
    bare = "rediss://h:6380/0"
    amqp = "amqp://guest:guest@127.0.0.1:5672//"
    seen = probe("keep", redis_url, verified, bare, amqp)
    assert seen[redis_url][:2] == ["ScreenedTransport", "redis"]  # Flower reads the scheme
    assert seen[verified] == [
        "ScreenedTransport",
        "rediss",
        "{'ssl_cert_reqs': <VerifyMode.CERT_REQUIRED: 2>}",
    ]
    assert seen[bare][:2] == ["ScreenedTransport", "rediss"]  # kombu's own default for it
    assert seen[bare][2] == "{'ssl_cert_reqs': <VerifyMode.CERT_NONE: 0>}"
    assert seen[amqp][:2] == ["Transport", "amqp"]  # the broker frames each message
    assert seen["again"] == "installed"  # the same transport again: nothing to refuse
    assert probe("log", redis_url)[redis_url][0] == "LoggingTransport"


def test_install_after_kombu_resolved_redis_is_refused() -> None:
    script = (
        "from kombu.transport import get_transport_cls; get_transport_cls('redis');"
        "from control.broker import screen; screen.install()"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode != 0
    assert "kombu already resolved redis:// in this process" in done.stderr
