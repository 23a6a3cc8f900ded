"""The control's side of witnessing: ask each witness (TOOLPLANE_WITNESS_URLS) to cosign a
checkpoint before it is written, with a consistency proof from the size it holds.

A witness that refuses (403, 422, 400) is recorded beside the checkpoint
(``<size>.refused``, which `ledger verify` names); one that cannot be reached is
logged and the checkpoint is written without its cosignature."""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable

import httpx

from ledger.checkpoint import Checkpoint
from ledger.cosignature import CosignatureVerifier
from ledger.note import NoteError, split_note

__all__ = ["WitnessClient"]

log = logging.getLogger("toolplane.control")
TIMEOUT_S = 10.0


class WitnessClient:
    def __init__(self, urls: list[str], keys: list[CosignatureVerifier]) -> None:
        self.urls, self.keys = urls, keys

    def _ask(self, url: str, old: int, proof: list[bytes], note: bytes) -> httpx.Response:
        lines = [f"old {old}", *(base64.b64encode(p).decode() for p in proof)]
        body = ("\n".join(lines) + "\n\n").encode() + note
        return httpx.post(url.rstrip("/") + "/add-checkpoint", content=body, timeout=TIMEOUT_S)

    def cosign(
        self,
        checkpoint: Checkpoint,
        note: bytes,
        *,
        previous: int,
        prove: Callable[[int], list[bytes]],
        refused: Callable[[str, str], None],
    ) -> list[str]:
        """Cosignature lines for ``note``; ``previous``: the size the log checkpointed last
        (the witness's likely state); ``prove(old)``: a consistency proof to this size."""
        lines = []
        for url in self.urls:
            old = previous
            try:
                answer = self._ask(url, old, prove(old), note)
                if answer.status_code == 409 and answer.text.strip().isdigit():
                    old = int(answer.text.strip())  # the witness holds another size
                    if old > checkpoint.size:
                        refused(url, f"the witness holds size {old}, past {checkpoint.size}")
                        continue
                    answer = self._ask(url, old, prove(old), note)
            except httpx.HTTPError as e:
                log.warning("witness.unreachable url=%s error=%s", url, e)
                continue
            if answer.status_code != 200:
                refused(url, f"{answer.status_code}: {answer.text.strip()[:500]}")
                continue
            line = answer.text
            try:
                _, sigs = split_note(checkpoint.text().encode() + b"\n" + line.encode())
                text = checkpoint.text()
                if self.keys and not any(self._verified(k, text, sigs[0]) for k in self.keys):
                    raise NoteError("by no pinned witness key")
            except NoteError as e:
                refused(url, f"its cosignature is not valid: {e}")
                continue
            lines.append(line)
        return lines

    @staticmethod
    def _verified(key: CosignatureVerifier, text: str, sig: object) -> bool:
        try:
            key.verify(text, sig)  # type: ignore[arg-type]
        except NoteError:
            return False
        return True
