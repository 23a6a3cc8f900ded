"""``toolplane witness``: the witness as its own HTTP process (ledger/witness.py decides).

Serves ``POST /add-checkpoint`` (C2SP tlog-witness) on its bind address with its own key
and state directory; it holds no database URL, broker URL or control key."""

from __future__ import annotations

import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ledger.witness import MAX_BODY, Witness

__all__ = ["make_witness_server"]

log = logging.getLogger("toolplane.witness")


def make_witness_server(witness: Witness, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        server_version = "toolplane-witness"

        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            if self.path != "/add-checkpoint":
                self._send(404, "not found\n", "text/plain")
                return
            try:
                length = int(self.headers.get("Content-Length", "-1"))
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY:
                self._send(400, "Content-Length missing or too large\n", "text/plain")
                return
            answer = witness.add_checkpoint(self.rfile.read(length))
            self._send(answer.status, answer.body, answer.content_type)

        def _send(self, status: int, body: str, content_type: str) -> None:
            data = body.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            log.info("witness.request %s", format % args)

    return ThreadingHTTPServer((host, port), Handler)
