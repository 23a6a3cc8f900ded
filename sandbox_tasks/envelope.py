"""Verification of job envelopes by a sandbox worker (pure but for the clock).

Time is the worker's own: the control's key is judged by when the worker receives
the job (``now_ms``), never by the envelope's ``issued_at``, so an envelope signed
with a retired or revoked key cannot be backdated into the key's old window. And an
envelope's own claims are bounded: it may live at most MAX_ENVELOPE_LIFETIME_S and
may not be issued further in the future than the clock skew.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from sandbox_tasks.errors import EnvelopeRefused
from toolplane.canonical import digest
from toolplane.errors import CanonicalJSONError, SignatureError, first_problem
from toolplane.lifetimes import CLOCK_SKEW_S, MAX_ENVELOPE_LIFETIME_S
from toolplane.messages import SignedEnvelope, ms_to_datetime, signed_bytes
from toolplane.signing import KeyRing

CLOCK_SKEW_MS = CLOCK_SKEW_S * 1000
MAX_LIFETIME_MS = MAX_ENVELOPE_LIFETIME_S * 1000

__all__ = ["CLOCK_SKEW_MS", "MAX_LIFETIME_MS", "verify_envelope"]


def verify_envelope(raw: Any, *, tool: str, keys: KeyRing, now_ms: int) -> SignedEnvelope:
    """Return the envelope if control signed it for ``tool`` and it is live; else refuse.

    ``now_ms`` is when this worker received the job. Refusal codes: ``envelope_invalid``
    (malformed, unsigned, badly signed, a key not trusted when received, wrong tool or
    audience, args that do not match their hash, issued in the future, a lifetime over
    the bound) and ``envelope_expired``.
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
            received=ms_to_datetime(now_ms),
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
    ahead = envelope.issued_at - now_ms
    if ahead > CLOCK_SKEW_MS:
        raise EnvelopeRefused(
            "envelope_invalid",
            f"envelope.issued_at: issued {ahead} ms in the future, beyond the allowed clock "
            f"skew of {CLOCK_SKEW_MS} ms (job {envelope.job_id})",
        )
    lifetime = envelope.expires_at - envelope.issued_at
    if lifetime > MAX_LIFETIME_MS:
        raise EnvelopeRefused(
            "envelope_invalid",
            f"envelope.expires_at: the envelope would live {lifetime} ms (expires_at - "
            f"issued_at), over the bound of {MAX_LIFETIME_MS} ms (job {envelope.job_id})",
        )
    if now_ms >= envelope.expires_at:
        raise EnvelopeRefused("envelope_expired", "envelope expired")
    return signed
