"""Files and servers the test stack serves to tools: the hostile repository, the
plugin's own data root, the loopback HTTP server the egress tests fetch from."""

from __future__ import annotations

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

SYMLINKED_SECRET = "sk-behind-a-symlink-0451"
FIXTURE_ROOT_NOTE = "a note in the plugin's own root\n"


def add_hostile_files(repo: Path) -> None:
    """What an attacker who can commit to the repository would leave for read_repo_file."""
    hostile = repo / "hostile"
    hostile.mkdir(exist_ok=True)
    links = {"passwd": "/etc/passwd", "etc": "/etc", "zero": "/dev/zero", "up": "../../.."}
    for name, target in links.items():
        if not (hostile / name).is_symlink():
            (hostile / name).symlink_to(target)
    if not (hostile / "fifo").exists():
        os.mkfifo(hostile / "fifo")
    (hostile / "big.txt").write_text("x" * 1_100_000)
    (hostile / "binary.bin").write_bytes(b"\x7fELF\x00\x01\x02")
    (hostile / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    # a link that stays inside the root: policy judges the path as typed (src/*), the
    # file behind it is one policy never lets a call read (.env)
    (repo / ".env").write_text(f"API_KEY={SYMLINKED_SECRET}\n")
    for link, target in (("src/shipit/settings.txt", "../../.env"), ("src/lib", "shipit")):
        if not (repo / link).is_symlink():
            (repo / link).symlink_to(target)


class _Handler(BaseHTTPRequestHandler):
    """What the egress tests fetch (loopback only)."""

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        if self.path == "/host":  # which name the client asked for (Host header)
            body = str(self.headers.get("Host", "")).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1:6379/")
            self.end_headers()
            return
        body = b"x" * 2_000_000 if self.path == "/big" else b"hello from the allowed host"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def start_http_server() -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
