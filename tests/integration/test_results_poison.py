"""What a compromised worker may push onto ``results`` (its ACL allows LPUSH there) must not
stop the control from ingesting everyone else's results."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

import celeryconfig
from control.broker.screen import REJECTED_KEY
from tests.harness import Stack, wait_for

pytestmark = pytest.mark.integration


HEADERS = {"task": celeryconfig.INGEST_TASK, "id": "x", "lang": "py", "argsrepr": "x"}


def _envelope(task_body: bytes, **over: object) -> str:
    message = {
        "body": base64.b64encode(task_body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": HEADERS,
        "properties": {
            "body_encoding": "base64",
            "delivery_tag": "d-1",
            "delivery_info": {"exchange": "", "routing_key": celeryconfig.RESULTS_QUEUE},
            "priority": 0,
        },
    }
    message.update(over)
    return json.dumps(message)


POISON = {
    "not json": b"\xff\xfenot json at all",
    "json list": b"[1, 2, 3]",
    "json number": b"42",
    "empty object": b"{}",
    "no properties": json.dumps({"body": "e30=", "headers": {}}).encode(),
    "properties a string": _envelope(b"[[], {}, {}]", properties="x").encode(),
    "body not base64": _envelope(b"").replace('"body": ""', '"body": "!!!"').encode(),
    "pickle content": _envelope(
        b"\x80\x04K\x01.", **{"content-type": "application/x-python-serialize"}
    ).encode(),
    "body not json": _envelope(b"{not json").encode(),
    "headers a list": _envelope(b"[[], {}, {}]", headers=[1]).encode(),
    "unknown task": _envelope(b"[[], {}, {}]", headers={"task": "os.system", "id": "y"}).encode(),
    "no task header": _envelope(b"[[], {}, {}]", headers={}).encode(),
    "deep nesting": b"[" * 100000 + b"]" * 100000,
    "deep nesting in the envelope": _envelope(b"[[], {}, {}]", headers={"x": "DEEP"})
    .replace('"DEEP"', "[" * 50000 + "]" * 50000)
    .encode(),
    "delivery tag an object": _envelope(b"[[], {}, {}]")
    .replace('"delivery_tag": "d-1"', '"delivery_tag": {"a": 1}')
    .encode(),
    "body a list": _envelope(b"[[], {}, {}]", body=[1, 2]).encode(),
    "body not a list": _envelope(b'{"a": 1}').encode(),
    "body null": _envelope(b"null").encode(),
    "body one item": _envelope(b"[1]").encode(),
    "task an int": _envelope(b"[[], {}, {}]", headers={"task": 7, "id": "z"}).encode(),
    "eta garbage": _envelope(b"[[{}], {}, {}]", headers=dict(HEADERS, eta="soon")).encode(),
    "expires garbage": _envelope(b"[[{}], {}, {}]", headers=dict(HEADERS, expires=[1])).encode(),
    "timelimit strings": _envelope(
        b"[[{}], {}, {}]", headers=dict(HEADERS, timelimit=["a", "b"])
    ).encode(),
    "retries a string": _envelope(b"[[{}], {}, {}]", headers=dict(HEADERS, retries="x")).encode(),
    "id an object": _envelope(b"[[{}], {}, {}]", headers=dict(HEADERS, id={"x": 1})).encode(),
    "args a forged result": _envelope(
        json.dumps([[{"job_id": "run_x/a/1", "receipt": {}}], {}, {}]).encode()
    ).encode(),
    "kwargs not an object": _envelope(b"[[], [1], {}]").encode(),
    "embed not an object": _envelope(b"[[], {}, 5]").encode(),
    "embed a callback": _envelope(
        json.dumps(
            [[{}], {}, {"callbacks": [{"task": "tool.sleepy", "args": [], "options": {}}]}]
        ).encode()
    ).encode(),
    "embed a chord": _envelope(b'[[{}], {}, {"chord": {"task": "x"}}]').encode(),
    # kombu's JSON turns {"__type__", "__value__"} into values, and fails on unknown types.
    "a kombu type it does not know": _envelope(
        b"[[], {}, {}]", headers=dict(HEADERS, z={"__type__": "nope", "__value__": 1})
    ).encode(),
    "no routing": _envelope(b"[[{}], {}, {}]")
    .replace('"exchange": "", "routing_key": "results"', "")
    .encode(),
    # kombu would restore it, unacknowledged, to the list it names: with the control's rights.
    "routed to a tool's queue": _envelope(b"[[{}], {}, {}]")
    .replace('"routing_key": "results"', '"routing_key": "tool.sleepy"')
    .encode(),
    "priority a string": _envelope(b"[[{}], {}, {}]")
    .replace('"priority": 0', '"priority": "x"')
    .encode(),
    "eta in 2099": _envelope(
        b"[[{}], {}, {}]", headers=dict(HEADERS, eta="2099-01-01T00:00:00+00:00")
    ).encode(),
    "celery.group": _envelope(
        json.dumps(
            [
                [
                    [
                        {
                            "task": "tool.sleepy",
                            "args": [],
                            "kwargs": {},
                            "options": {"queue": "tool.sleepy"},
                        }
                    ]
                ],
                {},
                {},
            ]
        ).encode(),
        headers=dict(HEADERS, task="celery.group"),
    ).encode(),
    "celery.chord_unlock": _envelope(
        b'[["g", [["x", null]]], {}, {}]', headers=dict(HEADERS, task="celery.chord_unlock")
    ).encode(),
}

# What the control's screen sets aside, by the rule it names (the start of it); the others
# Celery rejects itself (content it does not accept, a bad expiry), or ingest records them.
SET_ASIDE = {
    "not json": "not UTF-8",
    "json list": "not a JSON object (list)",
    "json number": "not a JSON object (int)",
    "empty object": "properties: not an object",
    "no properties": "properties: not an object",
    "properties a string": "properties: not an object",
    "body not base64": "body: not base64",
    "headers a list": "headers: not an object",
    "deep nesting": "JSON nested too deep",
    "deep nesting in the envelope": "JSON nested too deep",
    "delivery tag an object": "properties.delivery_tag: not a non-empty string",
    "body a list": "body: not a string",
    "body not a list": "body: not [args, kwargs, embed]",
    "body null": "body: not [args, kwargs, embed]",
    "body one item": "body: not [args, kwargs, embed]",
    "id an object": "headers.id: not a non-empty string",
    "kwargs not an object": "body: kwargs not an object",
    "embed not an object": "body: embed not an object",
    "embed a callback": "body: embed carries callbacks, errbacks, a chain or a chord",
    "embed a chord": "body: embed carries callbacks, errbacks, a chain or a chord",
    "unknown task": "headers.task: 'os.system' is not a task the control serves",
    "no task header": "headers.task: missing (not a protocol 2 task message)",
    "task an int": "headers.task: '7' is not a task the control serves",
    "eta garbage": "headers.eta: not an ISO 8601 time",
    "a kombu type it does not know": "not kombu's JSON (ValueError:",
    "no routing": "properties.delivery_info: exchange and routing_key must be strings",
    "routed to a tool's queue": (
        "properties.delivery_info: routed to ''/'tool.sleepy', not 'results'"
    ),
    "priority a string": "properties.priority: not an integer from 0 to 255",
    "eta in 2099": "headers.eta: more than 300 s ahead",
    "celery.group": "headers.task: 'celery.group' is not a task the control serves",
    "celery.chord_unlock": "headers.task: 'celery.chord_unlock' is not a task the control serves",
}


@pytest.mark.parametrize("name", list(POISON))
def test_a_poisoned_results_queue_does_not_stop_ingest(stack: Stack, token: str, name: str) -> None:
    client = stack.client(token)
    control = stack.pid("control")
    redis = stack.services.redis()
    set_aside = redis.llen(REJECTED_KEY)
    redis.lpush(celeryconfig.RESULTS_QUEUE, POISON[name])
    view = client.call("read_repo_file", {"path": "README.md"}, wait=True, timeout=30)
    assert view.status == "completed", view
    assert stack.pid("control") == control
    assert redis.llen("tool.sleepy") == 0  # nothing was sent on to a tool's queue
    if name in SET_ASIDE:
        assert redis.llen(REJECTED_KEY) == set_aside + 1
        kept = json.loads(redis.lindex(REJECTED_KEY, 0))
        assert kept["queue"] == celeryconfig.RESULTS_QUEUE
        assert kept["problem"].startswith(SET_ASIDE[name]), kept["problem"]
        if kept["size"] == len(POISON[name]):  # the item itself (not kombu's parsed message)
            assert kept["sha256"] == hashlib.sha256(POISON[name]).hexdigest()
    else:
        assert redis.llen(REJECTED_KEY) == set_aside
    # Nothing is left behind to come back after the visibility timeout.
    wait_for(
        lambda: redis.llen(celeryconfig.RESULTS_QUEUE) == 0 and redis.hlen("unacked") == 0,
        timeout=10,
        what="the results queue and the control's unacked hash to empty",
    )
