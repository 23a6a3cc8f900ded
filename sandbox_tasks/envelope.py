"""Verification of job envelopes by a sandbox worker (pure but for the clock)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from sandbox_tasks.errors import EnvelopeRefused
from toolplane.canonical import digest
from toolplane.errors import CanonicalJSONError, SignatureError, first_problem
from toolplane.messages import SignedEnvelope, ms_to_datetime, signed_bytes
from toolplane.signing import KeyRing

CLOCK_SKEW_MS = 30_000

__all__ = ["verify_envelope"]


def verify_envelope(raw: Any, *, tool: str, keys: KeyRing, now_ms: int) -> SignedEnvelope:
    """Return the envelope if control signed it for ``tool`` and it is live; else refuse.

    Refusal codes: ``envelope_invalid`` (malformed, unsigned, badly signed, wrong
    tool or audience, args that do not match their hash) and ``envelope_expired``.
    """
    try:
        signed = SignedEnvelope.model_validate(raw)
    except ValidationError as e:
        field, rule = first_problem(e, where="envelope")
        raise EnvelopeRefused("envelope_invalid", f"malformed envelope: {field}: {rule}") from e
    envelope = signed.envelope
    try:
        keys.verify(
            key_id=envelope.key_id,
            algorithm="ed25519",
            data=signed_bytes(envelope),
            signature=signed.signature,
            owner="control",
            at=ms_to_datetime(envelope.issued_at),
        )
        args_digest = digest(envelope.args)
    except (SignatureError, CanonicalJSONError, ValueError, OverflowError) as e:
        # ValueError: pydantic's depth limit; OverflowError: absurd timestamps
        raise EnvelopeRefused("envelope_invalid", f"envelope signature: {e}") from e
    if envelope.tool != tool or envelope.audience != f"tool.{tool}":
        raise EnvelopeRefused(
            "envelope_invalid",
            f"envelope is for {envelope.audience!r}, this worker serves tool.{tool}",
        )
    if envelope.args_sha256 != args_digest:
        raise EnvelopeRefused("envelope_invalid", "args do not match args_sha256")
    if envelope.issued_at > now_ms + CLOCK_SKEW_MS:
        raise EnvelopeRefused("envelope_invalid", "envelope issued in the future")
    if now_ms >= envelope.expires_at:
        raise EnvelopeRefused("envelope_expired", "envelope expired")
    return signed
