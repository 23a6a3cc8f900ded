"""The broker screen's rules (its effect on a running control: tests/integration)."""

from __future__ import annotations

import base64
import json
import ssl

import pytest

from control.broker_screen import CONSUMER_PATH, TRANSPORT_PATH, envelope_problem, screened


def envelope(**over: object) -> bytes:
    message = {
        "body": base64.b64encode(b"[[], {}, {}]").decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"task": "control.ingest_result", "id": "x"},
        "properties": {"body_encoding": "base64", "delivery_tag": "t", "delivery_info": {}},
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
    tag = envelope(properties={"delivery_tag": 1})
    assert envelope_problem(tag) == "properties.delivery_tag: not a non-empty string"
    info = envelope(properties={"delivery_tag": "t", "delivery_info": "x"})
    assert envelope_problem(info) == "properties.delivery_info: not an object"
    zipped = envelope(properties={"delivery_tag": "t", "body_encoding": "zlib"})
    assert envelope_problem(zipped) == "properties.body_encoding: 'zlib' is not base64"
    assert envelope_problem(envelope(headers="x")) == "headers: not an object"
    assert envelope_problem(envelope(**{"content-type": 1})) == "content-type: not a string"
    assert envelope_problem(envelope(body=3)) == "body: not a string"
    assert envelope_problem(envelope(body="a b")) == "body: not base64"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://u:p@127.0.0.1:6379/1", {"broker_transport": TRANSPORT_PATH}),
        (
            "rediss://h:6380/0?ssl_cert_reqs=required",
            {"broker_transport": TRANSPORT_PATH},
        ),
        (  # kombu's own transport would not verify the server for a bare rediss:// URL
            "rediss://h:6380/0",
            {
                "broker_transport": TRANSPORT_PATH,
                "broker_use_ssl": {"ssl_cert_reqs": ssl.CERT_REQUIRED},
            },
        ),
        ("amqp://guest:guest@127.0.0.1:5672//", {}),  # the broker frames each message
    ],
)
def test_only_redis_consumers_are_screened(url: str, expected: dict) -> None:
    assert screened(url) == expected


def test_a_rediss_url_keeps_its_tls_settings_through_the_screened_transport() -> None:
    from celery import Celery

    app = Celery("t", set_as_current=False)
    app.conf.broker_url = "rediss://u:p@127.0.0.1:6390/3?ssl_cert_reqs=required"
    app.conf.update(screened(app.conf.broker_url))
    connection = app.connection_for_read()
    assert connection.transport_cls == TRANSPORT_PATH
    assert connection.ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert (connection.hostname, connection.virtual_host) == ("127.0.0.1", "3")
    assert CONSUMER_PATH.startswith("control.broker_screen:")
