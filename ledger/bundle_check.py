"""Verifying an offline evidence bundle: no database, broker or network (pure).

The bundle is one RFC 8785 canonical JSON object (docs/ledger.md, "Evidence bundles"):

    {"format": "toolplane-evidence-bundle/1", "run_id": ..., "checkpoint": <signed note>,
     "events": [{"seq": n, "leaf": <base64 leaf bytes>, "proof": [<base64 hash>, ...]}],
     "keys": [{"key_id", "owner", "algorithm", "public_key", "not_before", "not_after",
               "revoked_at"}],
     "artifacts": [{"sha256", "size", "media_type", "data": <base64 bytes>}]}

``artifacts`` is there only when an event names an artifact (a result kept outside the
database, ledger/artifacts.py): its bytes are checked against its hash, then put back
into the event's result message before its receipt is checked.

``check_bundle`` returns every problem it finds, each naming the part (``bundle``,
``checkpoint``, ``events[3].proof``, ``events[3].receipt``, ``keys[1]``,
``artifacts[0]``, ``events[5].artifact``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ledger.artifacts import (
    ArtifactProblem,
    ArtifactStore,
    MemoryArtifactStore,
    message_with_artifact,
)
from ledger.checkpoint import Checkpoint
from ledger.cosignature import CosignatureVerifier, cosignature_problem
from ledger.merkle import MerkleError, leaf_hash, verify_inclusion
from ledger.note import NoteError, NoteVerifier, open_note
from ledger.receipts import ReceiptProblem, check_result_message, check_unsigned_result
from toolplane.canonical import canonical_json, parse_json_strict
from toolplane.errors import SignatureError, ToolplaneError
from toolplane.messages import ResultMessage, SignedEnvelope, signed_bytes
from toolplane.signing import KeyRing, PublicKey

__all__ = [
    "BUNDLE_FORMAT",
    "BundleReport",
    "artifact_to_json",
    "check_bundle",
    "key_from_json",
    "key_to_json",
]

BUNDLE_FORMAT = "toolplane-evidence-bundle/1"
RECEIPT_KINDS = frozenset({"ToolCallCompleted", "ToolCallFailed", "JobRefused", "ResultIgnored"})
KEY_FIELDS = {"key_id", "owner", "algorithm", "public_key", "not_before", "not_after", "revoked_at"}
ARTIFACT_FIELDS = {"sha256", "size", "media_type", "data"}
MAX_BUNDLE = 256 << 20
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat()


def key_to_json(key: PublicKey) -> dict[str, Any]:
    return {
        "key_id": key.key_id,
        "owner": key.owner,
        "algorithm": key.algorithm,
        "public_key": base64.b64encode(key.material).decode(),
        "not_before": _iso(key.not_before),
        "not_after": _iso(key.not_after),
        "revoked_at": _iso(key.revoked_at),
    }


def artifact_to_json(ref: Any, data: bytes) -> dict[str, Any]:
    return {
        "sha256": ref.sha256,
        "size": ref.size,
        "media_type": ref.media_type,
        "data": base64.b64encode(data).decode(),
    }


class _Carried(MemoryArtifactStore):
    """A bundle's artifacts, with where each is in it and which its events asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.where: dict[str, str] = {}
        self.named: set[str] = set()

    def get(self, sha256: str, *, limit: int) -> bytes:
        self.named.add(sha256)
        return super().get(sha256, limit=limit)

    def unnamed(self, report: BundleReport) -> None:
        """Bytes no event names are bound by no receipt: named, not counted as verified."""
        for digest, where in self.where.items():
            if digest not in self.named:
                report.artifacts -= 1
                report.problems.append(
                    f"{where} (sha256:{digest}): no event of the bundle names it"
                )


def _artifacts(value: Any, report: BundleReport) -> _Carried:
    """The artifacts a bundle carries whose bytes match their hash (the rest are named)."""
    store = _Carried()
    if not isinstance(value, list):
        report.problems.append("artifacts: not a list")
        return store
    for j, entry in enumerate(value):
        where = f"artifacts[{j}]"
        if not isinstance(entry, dict) or set(entry) != ARTIFACT_FIELDS:
            report.problems.append(
                f"{where}: expected exactly the fields {sorted(ARTIFACT_FIELDS)}"
            )
            continue
        try:
            data = _b64(entry["data"], f"{where}.data")
        except ValueError as e:
            report.problems.append(str(e))
            continue
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            report.problems.append(
                f"{where} (sha256:{str(entry['sha256'])[:64]}): its bytes do not match its hash "
                "and size (changed)"
            )
            continue
        if entry["sha256"] in store.where:
            report.problems.append(
                f"{where} (sha256:{entry['sha256']}): carried already as "
                f"{store.where[entry['sha256']]}"
            )
            continue
        store.where[store.put(data)] = where
        report.artifacts += 1
    return store


def _b64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{what}: not a string")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise ValueError(f"{what}: not valid base64") from e
    if base64.b64encode(raw).decode() != text:
        raise ValueError(f"{what}: not canonical base64")
    return raw


def _time(value: Any, what: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{what}: not a time")
    at = datetime.fromisoformat(value)
    if at.tzinfo is None or at.isoformat() != value:
        raise ValueError(f"{what}: not an ISO 8601 time with its offset, as written")
    return at


def key_from_json(value: Any) -> PublicKey:
    if not isinstance(value, dict) or set(value) != KEY_FIELDS:
        raise ValueError(f"expected exactly the fields {', '.join(sorted(KEY_FIELDS))}")
    if value["algorithm"] != "ed25519":
        raise ValueError("only ed25519 keys can verify a receipt for a third party")
    material = _b64(value["public_key"], "public_key")
    if len(material) != 32:
        raise ValueError("public_key: not 32 bytes")
    not_before = _time(value["not_before"], "not_before")
    if not_before is None:
        raise ValueError("not_before: missing")
    for name in ("key_id", "owner"):
        if not isinstance(value[name], str) or not value[name]:
            raise ValueError(f"{name}: not a string")
    return PublicKey(
        key_id=value["key_id"],
        owner=value["owner"],
        algorithm="ed25519",
        material=material,
        not_before=not_before,
        not_after=_time(value["not_after"], "not_after"),
        revoked_at=_time(value["revoked_at"], "revoked_at"),
    )


@dataclass
class BundleReport:
    run_id: str | None = None
    origin: str | None = None
    tree_size: int | None = None
    events: int = 0
    receipts: int = 0
    envelopes: int = 0
    artifacts: int = 0
    witnesses: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unverifiable: list[str] = field(default_factory=list)  # HMAC receipts, no secret given

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "run_id": self.run_id,
            "origin": self.origin,
            "tree_size": self.tree_size,
            "events": self.events,
            "receipts_verified": self.receipts,
            "envelopes_verified": self.envelopes,
            "artifacts_verified": self.artifacts,
            "cosigned_by": self.witnesses,
            "problems": self.problems,
            "notes": self.notes,
            "receipts_not_verifiable": self.unverifiable,
        }


def check_bundle(
    data: bytes,
    checkpoint_keys: list[NoteVerifier],
    pinned_keys: list[dict[str, Any]] | None = None,
    witness_keys: list[CosignatureVerifier] | None = None,
    hmac_secrets: Mapping[str, Sequence[bytes]] | None = None,
) -> BundleReport:
    """Every check of the bundle ``data``; ``pinned_keys``: the key objects an auditor
    trusts (each key of the bundle must be one of them); without, the bundle's own keys
    are used and the report says that they were not pinned. ``witness_keys``: each must
    have cosigned the checkpoint. ``hmac_secrets``: the HMAC secrets the auditor holds, by
    key id or tool name; an HMAC receipt with none is reported as not verifiable."""
    report = BundleReport()
    if len(data) > MAX_BUNDLE:
        report.problems.append(f"bundle: larger than {MAX_BUNDLE} bytes")
        return report
    try:
        bundle = parse_json_strict(data)
        if canonical_json(bundle) != data:
            raise ValueError("not in RFC 8785 canonical form")
    except (ToolplaneError, ValueError) as e:
        report.problems.append(f"bundle: {e}")
        return report
    expected = {"format", "run_id", "checkpoint", "events", "keys"}
    if isinstance(bundle, dict) and "artifacts" in bundle:
        expected.add("artifacts")
    if not isinstance(bundle, dict) or set(bundle) != expected:
        report.problems.append(f"bundle: expected exactly the fields {', '.join(sorted(expected))}")
        return report
    if bundle["format"] != BUNDLE_FORMAT:
        report.problems.append(f"bundle.format: not {BUNDLE_FORMAT}")
        return report
    report.run_id = bundle["run_id"]
    try:
        text, _ = open_note(str(bundle["checkpoint"]).encode("utf-8"), checkpoint_keys)
        checkpoint = Checkpoint.parse(text)
    except NoteError as e:
        report.problems.append(f"checkpoint: {e}")
        return report
    report.origin, report.tree_size = checkpoint.origin, checkpoint.size
    for witness in witness_keys or []:
        problem = cosignature_problem(str(bundle["checkpoint"]).encode("utf-8"), witness)
        if problem:
            report.problems.append(f"checkpoint: {problem}")
        else:
            report.witnesses.append(witness.name)
    ring = _keys(bundle["keys"], pinned_keys, report)
    artifacts = _artifacts(bundle.get("artifacts", []), report)
    if not isinstance(bundle["events"], list) or not bundle["events"]:
        report.problems.append("events: not a non-empty list")
        return report
    envelopes: dict[tuple[str, int], str] = {}
    last_seq = 0
    for i, entry in enumerate(bundle["events"]):
        where = f"events[{i}]"
        try:
            leaf, seq = _event(entry, where, checkpoint, bundle["run_id"], last_seq)
        except ValueError as e:
            report.problems.append(str(e))
            continue
        last_seq = seq
        report.events += 1
        _links(leaf, where, ring, envelopes, report, hmac_secrets or {}, artifacts)
    artifacts.unnamed(report)
    return report


def _keys(keys: Any, pinned: list[dict[str, Any]] | None, report: BundleReport) -> KeyRing:
    ring = KeyRing()
    if not isinstance(keys, list):
        report.problems.append("keys: not a list")
        return ring
    for j, value in enumerate(keys):
        try:
            key = key_from_json(value)
        except (ValueError, TypeError) as e:
            report.problems.append(f"keys[{j}]: {e}")
            continue
        if pinned is not None and value not in pinned:
            report.problems.append(
                f"keys[{j}] ({key.key_id}): not pinned by the trust file (or its validity "
                "window changed since the trust file was written)"
            )
            continue
        ring.add(key)
    if pinned is None:
        report.notes.append(
            "receipts and envelopes were checked against the keys the bundle carries, "
            "which no trust file pinned"
        )
    return ring


def _event(
    entry: Any, where: str, checkpoint: Checkpoint, run_id: Any, last_seq: int
) -> tuple[dict[str, Any], int]:
    if not isinstance(entry, dict) or set(entry) != {"seq", "leaf", "proof"}:
        raise ValueError(f"{where}: expected exactly the fields leaf, proof, seq")
    seq = entry["seq"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq <= last_seq:
        raise ValueError(f"{where}.seq: not a sequence number after the previous event's")
    try:
        raw = _b64(entry["leaf"], f"{where}.leaf")
        if not isinstance(entry["proof"], list):
            raise ValueError(f"{where}.proof: not a list")
        proof = [_b64(p, f"{where}.proof[{k}]") for k, p in enumerate(entry["proof"])]
    except ValueError as e:
        raise ValueError(str(e)) from e
    try:
        verify_inclusion(leaf_hash(raw), seq - 1, checkpoint.size, proof, checkpoint.root)
    except MerkleError as e:
        raise ValueError(f"{where}.proof: {e} (leaf or proof altered)") from e
    try:
        leaf = parse_json_strict(raw)
    except ToolplaneError as e:
        raise ValueError(f"{where}.leaf: {e}") from e
    if not isinstance(leaf, dict) or leaf.get("seq") != seq:
        raise ValueError(f"{where}.leaf: its seq is not {seq}")
    chain_id = leaf.get("chain_id")
    if not isinstance(chain_id, str) or not checkpoint.origin.endswith(
        "/" + chain_id.replace(":", "/", 1)
    ):
        raise ValueError(f"{where}.leaf: chain {leaf.get('chain_id')!r} is not the checkpoint's")
    if leaf.get("run_id") != run_id:
        raise ValueError(f"{where}.leaf: belongs to run {leaf.get('run_id')!r}, not {run_id!r}")
    return leaf, seq


def _links(
    leaf: dict[str, Any],
    where: str,
    ring: KeyRing,
    envelopes: dict[tuple[str, int], str],
    report: BundleReport,
    secrets: Mapping[str, Sequence[bytes]],
    artifacts: ArtifactStore,
) -> None:
    """The signatures inside an event: the dispatched envelope's, the result's receipt,
    and the receipt's binding to the envelope dispatched for that node and attempt."""
    kind, payload = leaf.get("kind"), leaf.get("payload")
    if not isinstance(payload, dict):
        return
    try:
        received = datetime.fromisoformat(str(leaf.get("created_at")))
    except ValueError:
        report.problems.append(f"{where}.leaf: created_at is not a time")
        return
    if kind == "ToolCallDispatched":
        try:
            signed = SignedEnvelope.model_validate(payload.get("envelope"))
            ring.verify(
                key_id=signed.envelope.key_id,
                algorithm="ed25519",
                data=signed_bytes(signed.envelope),
                signature=signed.signature,
                owner="control",
                received=received,
            )
        except (SignatureError, ValueError) as e:
            report.problems.append(f"{where}.envelope: {e}")
            return
        if signed.digest != payload.get("envelope_sha256"):
            report.problems.append(f"{where}.envelope: digest does not match envelope_sha256")
            return
        envelopes[(str(payload.get("node_id")), int(payload.get("attempt") or 0))] = signed.digest
        report.envelopes += 1
    elif kind in RECEIPT_KINDS and "message" in payload:
        try:
            raw = message_with_artifact(payload, artifacts)
            message = _receipt(raw, where, ring, received, secrets, report)
        except ArtifactProblem as e:
            report.problems.append(f"{where}.artifact: {e}")
            return
        except ReceiptProblem as e:
            report.problems.append(f"{where}.receipt: {e.message}")
            return
        if kind in ("ToolCallCompleted", "ToolCallFailed"):
            key = (str(payload.get("node_id")), int(payload.get("attempt") or 0))
            bound = envelopes.get(key)
            if bound is None or message.result.envelope_sha256 != bound:
                report.problems.append(
                    f"{where}.receipt: not bound to the envelope dispatched for node "
                    f"{key[0]} attempt {key[1]}"
                )


def _receipt(
    raw: Any,
    where: str,
    ring: KeyRing,
    received: datetime,
    secrets: Mapping[str, Sequence[bytes]],
    report: BundleReport,
) -> ResultMessage:
    """The result message of an event, its receipt checked (and counted) where it can be."""
    receipt = raw.get("receipt") if isinstance(raw, dict) else None
    if not (isinstance(receipt, dict) and receipt.get("algorithm") == "hmac-sha256"):
        message = check_result_message(raw, ring, received=received)
        report.receipts += 1
        return message
    message = check_unsigned_result(raw)  # the result's hash needs no key
    key_id, tool = message.receipt.key_id, message.result.tool
    given = [*secrets.get(key_id, ()), *secrets.get(tool, ())]
    if not given:
        report.unverifiable.append(where)
        report.notes.append(
            f"{where}.receipt: HMAC-SHA256 receipt of tool {tool} (key {key_id}): not "
            "verifiable by a third party without the secret (--hmac-secret); its result "
            "hash and envelope binding were checked, and the checkpoint covers the event"
        )
        return message
    problem = ""
    for secret in given:  # the key's window is not in the bundle: only its secret is given
        key = PublicKey(
            key_id=key_id,
            owner=f"tool.{tool}",
            algorithm="hmac-sha256",
            material=secret,
            not_before=EPOCH,
        )
        try:
            message = check_result_message(raw, KeyRing([key]), received=received)
        except ReceiptProblem as e:
            problem = e.message
            continue
        report.receipts += 1
        return message
    raise ReceiptProblem(
        f"HMAC-SHA256 receipt of tool {tool} (key {key_id}) does not verify with the "
        f"secret given for it: {problem}"
    )
