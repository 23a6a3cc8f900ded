"""Signed checkpoints kept outside the database, and the control's checkpointer.

A :class:`CheckpointStore` keeps them append-only. ``DirectoryCheckpointStore`` (the
default) keeps one file per checkpoint,
``<dir>/<chain path>/<size, 20 digits>.note`` (``tenant/<id>`` or ``system``), each
created once (``O_EXCL``) and never rewritten: the set of files only grows. The newest
checkpoint of a chain is its largest size. ``S3CheckpointStore`` (ledger/s3store.py)
keeps the same names as objects in an S3-compatible bucket.

``checkpoint_chain`` integrates a chain (ledger/tree.py), then signs a checkpoint of
the new size only if the tree is consistent with the newest stored checkpoint: a
consistency proof from it must verify, so a rewound or rewritten log is refused,
not checkpointed. The signing key is a C2SP signer key in a file of the key store
(``checkpoint.skey``, 0600), beside its verifier key (``checkpoint.vkey``), which
auditors pin.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from ledger.checkpoint import Checkpoint, origin_for
from ledger.cosignature import CosignatureVerifier, cosignature_problem
from ledger.errors import LedgerError
from ledger.merkle import MerkleError, verify_consistency
from ledger.models import ChainHead
from ledger.note import NoteError, NoteSigner, NoteVerifier, generate_signer, open_note, sign_note
from ledger.tree import integrate, prove_consistency

__all__ = [
    "CheckpointRefused",
    "CheckpointStore",
    "Cosigner",
    "DirectoryCheckpointStore",
    "Signed",
    "checkpoint_all",
    "checkpoint_chain",
    "load_signer",
    "newest_checkpoint",
    "trusted_checkpoints",
]

log = logging.getLogger("toolplane.ledger.checkpoints")
CHAIN = re.compile(r"^(system|tenant:[A-Za-z0-9_.-]{1,40})$")
NOTE = re.compile(r"^[0-9]{20}\.note$")


class CheckpointRefused(LedgerError):
    """The log is not consistent with its newest checkpoint: no checkpoint is signed."""

    def __init__(self, chain_id: str, problem: str) -> None:
        super().__init__(f"{chain_id}: {problem}")
        self.chain_id, self.problem = chain_id, problem


def _chain_path(chain_id: str) -> Path:
    if not CHAIN.match(chain_id):
        raise LedgerError(f"chain id {chain_id!r}: not a chain a checkpoint can name")
    return Path(*chain_id.split(":", 1))


class CheckpointStore(Protocol):
    """Signed checkpoints of each chain by size, and witnesses' refusals: only ever added
    to, never rewritten (``write`` of a size that exists with other bytes is refused)."""

    @property
    def location(self) -> str: ...

    def sizes(self, chain_id: str) -> list[int]: ...

    def read(self, chain_id: str, size: int) -> bytes: ...

    def latest(self, chain_id: str) -> bytes | None: ...

    def chains(self) -> Iterator[str]: ...

    def record_refusal(self, chain_id: str, size: int, witness: str, problem: str) -> None: ...

    def refusals(self, chain_id: str) -> list[dict[str, Any]]: ...

    def write(self, chain_id: str, size: int, note: bytes) -> object: ...


class DirectoryCheckpointStore:
    """Append-only files under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def location(self) -> str:
        return str(self.root)

    def _dir(self, chain_id: str) -> Path:
        return self.root / _chain_path(chain_id)

    def sizes(self, chain_id: str) -> list[int]:
        folder = self._dir(chain_id)
        if not folder.is_dir():
            return []
        return sorted(int(p.name[:20]) for p in folder.iterdir() if NOTE.match(p.name))

    def read(self, chain_id: str, size: int) -> bytes:
        return (self._dir(chain_id) / f"{size:020d}.note").read_bytes()

    def latest(self, chain_id: str) -> bytes | None:
        sizes = self.sizes(chain_id)
        return self.read(chain_id, sizes[-1]) if sizes else None

    def chains(self) -> Iterator[str]:
        if (self.root / "system").is_dir():
            yield "system"
        tenants = self.root / "tenant"
        if tenants.is_dir():
            for p in sorted(tenants.iterdir()):
                if CHAIN.match(f"tenant:{p.name}"):
                    yield f"tenant:{p.name}"

    def record_refusal(self, chain_id: str, size: int, witness: str, problem: str) -> None:
        """Append a witness's refusal to ``<chain path>/refusals.log`` (one JSON a line)."""
        folder = self._dir(chain_id)
        folder.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"size": size, "witness": witness, "problem": problem})
        with open(folder / "refusals.log", "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        log.error(
            "witness.refused chain=%s size=%s witness=%s problem=%s",
            chain_id,
            size,
            witness,
            problem,
        )

    def refusals(self, chain_id: str) -> list[dict[str, Any]]:
        path = self._dir(chain_id) / "refusals.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write(self, chain_id: str, size: int, note: bytes) -> Path:
        folder = self._dir(chain_id)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{size:020d}.note"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            # Another checkpointer signed the same tree first (Ed25519 is deterministic,
            # so the same key gives the same bytes); anything else is a fork.
            if path.read_bytes() != note:
                raise LedgerError(f"{path}: a different checkpoint of this size exists") from None
            return path
        try:
            os.write(fd, note)
            os.fsync(fd)
        finally:
            os.close(fd)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return path


class Cosigner(Protocol):
    def __call__(
        self,
        checkpoint: Checkpoint,
        note: bytes,
        *,
        previous: int,
        prove: Callable[[int], list[bytes]],
        refused: Callable[[str, str], None],
    ) -> list[str]: ...


def load_signer(keys_dir: Path, name: str, *, create: bool = True) -> NoteSigner:
    """The checkpoint signer key of ``keys_dir`` (created once, named ``name``)."""
    skey, vkey = keys_dir / "checkpoint.skey", keys_dir / "checkpoint.vkey"
    if skey.exists():
        signer = NoteSigner.parse(skey.read_text())
        if signer.name != name:
            raise LedgerError(
                f"{skey}: the checkpoint key is named {signer.name!r}, the deployment {name!r}"
            )
        return signer
    if not create:
        raise LedgerError(f"{skey}: no checkpoint key")
    keys_dir.mkdir(parents=True, exist_ok=True)
    signer = generate_signer(name)
    part = keys_dir / f"checkpoint.skey.{secrets.token_hex(8)}.part"
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(signer.skey + "\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(part, skey)  # exactly one process's key wins; the others read it
    except FileExistsError:
        return load_signer(keys_dir, name, create=False)
    finally:
        part.unlink()
    tmp = keys_dir / f"checkpoint.vkey.{secrets.token_hex(8)}.part"
    tmp.write_text(signer.verifier.vkey + "\n")
    os.replace(tmp, vkey)
    return signer


@dataclass(frozen=True)
class Signed:
    chain_id: str
    checkpoint: Checkpoint
    note: bytes
    written: bool


def newest_checkpoint(
    store: CheckpointStore, chain_id: str, verifiers: list[NoteVerifier]
) -> tuple[Checkpoint, bytes] | None:
    """The newest checkpoint of a chain, its signature verified; NoteError if bad."""
    note = store.latest(chain_id)
    if note is None:
        return None
    text, _ = open_note(note, verifiers)
    return Checkpoint.parse(text), note


def checkpoint_chain(
    session: Session,
    chain_id: str,
    *,
    signer: NoteSigner,
    store: CheckpointStore,
    deployment: str,
    cosign: Cosigner | None = None,
) -> Signed:
    """Integrate ``chain_id`` and sign a checkpoint of its tree if it grew. Commits the
    integration; raises CheckpointRefused if the tree is not consistent with the newest
    stored checkpoint (then nothing is written). ``cosign``: asks witnesses to cosign the
    note before it is written (their lines are added to it)."""
    try:
        tree = integrate(session, chain_id)
        session.commit()
    except LedgerError as e:
        session.rollback()
        raise CheckpointRefused(chain_id, f"integration refused: {e}") from e
    origin = origin_for(deployment, chain_id)
    try:
        newest = newest_checkpoint(store, chain_id, [signer.verifier])
    except NoteError as e:
        raise CheckpointRefused(chain_id, f"newest checkpoint unreadable: {e}") from e
    if newest is not None:
        old, note = newest
        if old.origin != origin:
            raise CheckpointRefused(chain_id, f"newest checkpoint names origin {old.origin!r}")
        if old.size > tree.size:
            raise CheckpointRefused(
                chain_id, f"log has {tree.size} leaves, its checkpoint {old.size}"
            )
        if old.size == tree.size:
            if old.root != tree.root:
                raise CheckpointRefused(
                    chain_id, f"root at size {old.size} differs from checkpoint"
                )
            return Signed(chain_id, old, note, written=False)
        proof, old_root, new_root = prove_consistency(session, chain_id, old.size, tree.size)
        try:
            verify_consistency(old.size, tree.size, proof, old.root, tree.root)
        except MerkleError as e:
            raise CheckpointRefused(
                chain_id, f"tree is not consistent with checkpoint {old.size}: {e}"
            ) from e
        if new_root != tree.root or old_root != old.root:
            raise CheckpointRefused(chain_id, "stored subtrees disagree with the tree's root")
    if tree.size == 0:
        raise CheckpointRefused(chain_id, "the chain has no events")
    checkpoint = Checkpoint(origin, tree.size, tree.root)
    note = sign_note(checkpoint.text(), [signer]).encode("utf-8")
    if cosign is not None:
        size = tree.size
        lines = cosign(
            checkpoint,
            note,
            previous=newest[0].size if newest is not None else 0,
            prove=lambda old: prove_consistency(session, chain_id, old, size)[0],
            refused=lambda who, why: store.record_refusal(chain_id, size, who, why),
        )
        note += "".join(lines).encode("utf-8")
    store.write(chain_id, tree.size, note)
    log.info("checkpoint.signed chain=%s size=%s", chain_id, tree.size)
    return Signed(chain_id, checkpoint, note, written=True)


def checkpoint_all(
    session: Session,
    *,
    signer: NoteSigner,
    store: CheckpointStore,
    deployment: str,
    cosign: Cosigner | None = None,
    chain_ids: list[str] | None = None,
) -> tuple[list[Signed], list[CheckpointRefused]]:
    """Checkpoint ``chain_ids`` (default: every chain that has events, in order);
    refusals are logged and returned."""
    if chain_ids is None:
        heads = session.scalars(select(ChainHead.chain_id).where(ChainHead.seq > 0))
        chain_ids = sorted(heads)
        session.rollback()
    signed, refused = [], []
    for chain_id in chain_ids:
        try:
            signed.append(
                checkpoint_chain(
                    session,
                    chain_id,
                    signer=signer,
                    store=store,
                    deployment=deployment,
                    cosign=cosign,
                )
            )
        except CheckpointRefused as e:
            log.error("checkpoint.refused chain=%s problem=%s", e.chain_id, e.problem)
            refused.append(e)
    return signed, refused


def trusted_checkpoints(
    store: CheckpointStore,
    chain_ids: list[str],
    verifiers: list[NoteVerifier],
    witnesses: Sequence[CosignatureVerifier] = (),
) -> tuple[dict[str, Checkpoint], list[str]]:
    """The newest checkpoint of each chain that has one, verified; and the problems, one
    line each: a checkpoint that does not verify, one that a pinned witness did not
    cosign, and every refusal of a witness recorded beside the chain's checkpoints."""
    found: dict[str, Checkpoint] = {}
    problems = []
    for chain_id in chain_ids:
        try:
            newest = newest_checkpoint(store, chain_id, verifiers)
        except (NoteError, OSError) as e:
            problems.append(f"{chain_id}: newest checkpoint does not verify: {e}")
            continue
        if newest is not None:
            found[chain_id] = newest[0]
            for witness in witnesses:
                problem = cosignature_problem(newest[1], witness)
                if problem:
                    problems.append(f"{chain_id}: checkpoint of size {newest[0].size}: {problem}")
        for r in store.refusals(chain_id):
            problems.append(
                f"{chain_id}: witness {r.get('witness')} refused to cosign the checkpoint of "
                f"size {r.get('size')}: {r.get('problem')}"
            )
    return found, problems
