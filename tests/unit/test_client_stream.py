"""The client's reading of the event stream: keep-alives, reconnects, the end (an
in-memory transport stands in for the server; the real one is in the integration tests)."""

from __future__ import annotations

import json

import httpx

from control.client import Client

RUN = {
    "run_id": "run_1",
    "tenant": "t",
    "workflow": "call",
    "status": "completed",
    "inputs": None,
    "idempotency_key": None,
    "environment": "dev",
    "classification": "internal",
    "submitter": "admin",
    "on_behalf_of": None,
    "created_at": "2026-12-07T00:00:00+00:00",
    "nodes": [],
}


def event(ident: int, kind: str, node: str | None, status: str) -> str:
    data = {"id": ident, "run_id": "run_1", "node_id": node, "status": status, "attempt": 1}
    return f"id: {ident}\nevent: {kind}\ndata: {json.dumps(data)}\n\n"


def test_keep_alives_and_a_dropped_stream_lose_nothing() -> None:
    asked: list[str | None] = []

    def serve(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/runs/run_1":
            return httpx.Response(200, json=RUN)
        asked.append(request.headers.get("Last-Event-ID"))
        if len(asked) == 1:  # one change, keep-alives (after which a decoder repeats the
            body = (  # last id with no data), then the connection drops
                "retry: 1000\n\n"
                + event(1, "node", "n", "queued")
                + ": keep-alive\n\n: keep-alive\n\n"
            )
        else:
            body = event(2, "node", "n", "completed") + event(3, "run", None, "completed")
            body += 'event: end\ndata: {"run_id": "run_1", "status": "completed"}\n\n'
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    seen: list[tuple[str, str, int]] = []
    with Client("http://api.test", token="tp_x", transport=httpx.MockTransport(serve)) as c:
        run = c.wait("run_1", timeout=10, on_progress=lambda *e: seen.append(e))
    assert run.status == "completed"
    assert asked == [None, "1"]  # reconnected from the last event it had seen
    assert seen == [("n", "queued", 1), ("n", "completed", 1)]
