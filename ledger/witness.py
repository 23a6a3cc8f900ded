"""The witness's logic (C2SP tlog-witness ``add-checkpoint``): its own key and state (pure
but for its state directory).

A witness cosigns a checkpoint only if the log's signature is by a key it pins, the
checkpoint's origin is under that key's name (``<name>/...``), the request's ``old``
size is the size it last cosigned for that origin, and the consistency proof from
that tree to the new one verifies. Else it refuses, says why, and appends the refusal
to ``refusals.log`` in its directory.

Request body: ``old <size>\\n``, one base64 proof hash per line, a blank line, then the
signed checkpoint note. Answers: 200 with the cosignature line; 409 with the size it
holds (``text/x.tlog.size``); 403 (no pinned log signed it); 422 (not consistent);
400 (malformed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ledger.checkpoint import Checkpoint
from ledger.cosignature import WitnessSigner
from ledger.merkle import EMPTY_ROOT, MerkleError, verify_consistency
from ledger.note import NoteError, NoteVerifier, b64_strict, generate_signer, open_note
from ledger.note import NoteSigner as _NoteSigner

__all__ = ["Answer", "Witness", "load_witness"]

log = logging.getLogger("toolplane.witness")
MAX_BODY = 64 * 1024


@dataclass(frozen=True)
class Answer:
    status: int
    body: str
    content_type: str = "text/plain; charset=utf-8"


def load_witness(home: Path, name: str) -> Witness:
    """The witness of ``home``: its key (made once, ``witness.skey``/``.vkey``), the logs it
    pins (``logs``: one verifier key a line) and its state (``state/``)."""
    home.mkdir(parents=True, exist_ok=True)
    skey = home / "witness.skey"
    if skey.exists():
        signer = _NoteSigner.parse(skey.read_text())
    else:
        signer = generate_signer(name)
        fd = os.open(skey, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(signer.skey + "\n")
    witness = WitnessSigner.of(signer)
    (home / "witness.vkey").write_text(witness.verifier.vkey + "\n")
    logs_file = home / "logs"
    lines = logs_file.read_text().split() if logs_file.exists() else []
    return Witness(home, witness, [NoteVerifier.parse(v) for v in lines])


class Witness:
    def __init__(self, home: Path, signer: WitnessSigner, logs: list[NoteVerifier]) -> None:
        self.home, self.signer, self.logs = home, signer, logs
        self._lock = threading.Lock()
        (home / "state").mkdir(exist_ok=True)

    def _state_path(self, origin: str) -> Path:
        return self.home / "state" / hashlib.sha256(origin.encode()).hexdigest()

    def state(self, origin: str) -> tuple[int, bytes]:
        path = self._state_path(origin)
        if not path.exists():
            return 0, EMPTY_ROOT
        saved = json.loads(path.read_text())
        return int(saved["size"]), bytes.fromhex(saved["root"])

    def _save(self, checkpoint: Checkpoint) -> None:
        path = self._state_path(checkpoint.origin)
        tmp = path.with_suffix(".part")
        record = {
            "origin": checkpoint.origin,
            "size": checkpoint.size,
            "root": checkpoint.root.hex(),
        }
        with open(tmp, "w") as f:
            f.write(json.dumps(record))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # durable before the cosignature leaves: a witness that
        # forgot what it cosigned would accept a rewound log as new

    def _refuse(self, status: int, origin: str | None, problem: str) -> Answer:
        log.error("witness.refused origin=%s problem=%s", origin, problem)
        line = json.dumps({"at": int(time.time()), "origin": origin, "problem": problem})
        with open(self.home / "refusals.log", "a") as f:
            f.write(line + "\n")
        return Answer(status, problem + "\n")

    def add_checkpoint(self, body: bytes, *, now: int | None = None) -> Answer:
        if len(body) > MAX_BODY:
            return self._refuse(400, None, f"request larger than {MAX_BODY} bytes")
        try:
            head, note = body.split(b"\n\n", 1)
            lines = head.decode("ascii").split("\n")
            if not lines[0].startswith("old ") or not lines[0][4:].isdigit():
                raise ValueError("the first line is not 'old <size>'")
            old = int(lines[0][4:])
            proof = [b64_strict(p, "proof") for p in lines[1:]]
        except (ValueError, UnicodeDecodeError, NoteError) as e:
            return self._refuse(400, None, f"malformed request: {e}")
        try:
            text, sigs = open_note(note, self.logs)
            checkpoint = Checkpoint.parse(text)
        except NoteError as e:
            return self._refuse(403, None, f"checkpoint: {e}")
        if not any(checkpoint.origin.startswith(s.name + "/") for s in sigs):
            return self._refuse(403, checkpoint.origin, "origin is not under the log key's name")
        with self._lock:
            size, root = self.state(checkpoint.origin)
            if old != size:
                return Answer(409, f"{size}\n", "text/x.tlog.size")
            if checkpoint.size < size:
                return self._refuse(
                    422,
                    checkpoint.origin,
                    f"checkpoint of size {checkpoint.size} is older than the {size} cosigned",
                )
            try:
                verify_consistency(size, checkpoint.size, proof, root, checkpoint.root)
            except MerkleError as e:
                return self._refuse(
                    422,
                    checkpoint.origin,
                    f"not consistent with the checkpoint of size {size} cosigned before: {e}",
                )
            self._save(checkpoint)
            line = self.signer.cosign(text, now if now is not None else int(time.time()))
        log.info("witness.cosigned origin=%s size=%s", checkpoint.origin, checkpoint.size)
        return Answer(200, line)
