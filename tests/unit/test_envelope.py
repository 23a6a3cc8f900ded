"""A sandbox worker runs a job only if control signed its envelope for this tool, now."""

from __future__ import annotations

import base64
import copy
import json
import math
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from control.orchestration.dispatch import sign_envelope
from sandbox_tasks.envelope import CLOCK_SKEW_MS, MAX_LIFETIME_MS, verify_envelope
from sandbox_tasks.errors import EnvelopeRefused
from toolplane.canonical import digest
from toolplane.lifetimes import MAX_ENVELOPE_LIFETIME_S, RETIRED_KEY_GRACE
from toolplane.messages import Envelope, SignedEnvelope, ms_to_datetime, now_ms, signed_bytes
from toolplane.signing import Ed25519Signer, KeyRing, PublicKey, b64encode, key_id_for

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
TOOL = "read_repo_file"
ARGS = {"path": "README.md", "start_line": None}


def ed25519(owner: str, *, key_id: str | None = None) -> tuple[Ed25519Signer, PublicKey]:
    private = Ed25519PrivateKey.generate()
    public = private.public_key().public_bytes_raw()
    key_id = key_id or key_id_for(owner, public)
    key = PublicKey(
        key_id=key_id, owner=owner, algorithm="ed25519", material=public, not_before=EPOCH
    )
    return Ed25519Signer(private_key=private, key_id=key_id, owner=owner), key


CONTROL, CONTROL_KEY = ed25519("control")
TOOL_SIGNER, TOOL_KEY = ed25519("tool.x")
RING = KeyRing([CONTROL_KEY, TOOL_KEY])


def make(
    *, signer=CONTROL, tool: str = TOOL, args=None, ttl_s: int = 3600, traceparent=None
) -> SignedEnvelope:
    return sign_envelope(
        signer=signer,
        run_id="run_1",
        node_id="n1",
        attempt=1,
        tenant="acme",
        principal="alice",
        tool=tool,
        args=dict(ARGS) if args is None else args,
        decision_id="dec_1",
        policy_version="a" * 64,
        ttl_s=ttl_s,
        traceparent=traceparent,
    )


def resign(envelope: Envelope, signer=CONTROL) -> dict:
    """A correctly signed message for an envelope built by hand."""
    signature = signer.sign(signed_bytes(envelope))
    return SignedEnvelope(envelope=envelope, signature=signature).model_dump(mode="json")


def check(raw, *, tool: str = TOOL, now: int | None = None, keys: KeyRing = RING):
    return verify_envelope(raw, tool=tool, keys=keys, now_ms=now_ms() if now is None else now)


def refusal(raw, **kw) -> EnvelopeRefused:
    with pytest.raises(EnvelopeRefused) as info:
        check(raw, **kw)
    return info.value


@pytest.fixture
def signed() -> SignedEnvelope:
    return make()


@pytest.fixture
def raw(signed) -> dict:
    return signed.model_dump(mode="json")


# -- the valid case ----------------------------------------------------------------


def test_valid_envelope_passes(signed, raw):
    verified = check(raw)
    assert verified == signed
    assert verified.envelope.args == ARGS
    assert verified.envelope.audience == f"tool.{TOOL}"
    assert verified.envelope.args_sha256 == digest(ARGS)
    assert verified.digest == signed.digest


def test_valid_envelope_passes_after_a_json_round_trip(raw):
    assert check(json.loads(json.dumps(raw))).envelope.job_id == "run_1/n1/1"


# -- malformed ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        "garbage",
        b"garbage",
        None,
        42,
        [],
        {},
        {"signature": "AAAA"},
        {"envelope": {}, "signature": "AAAA"},
        {"envelope": "x", "signature": "AAAA"},
    ],
)
def test_garbage_is_invalid(garbage):
    assert refusal(garbage, now=0).code == "envelope_invalid"


@pytest.mark.parametrize(
    "field", ["job_id", "tool", "audience", "args", "args_sha256", "nonce", "key_id", "expires_at"]
)
def test_missing_field_is_invalid(raw, field):
    del raw["envelope"][field]
    error = refusal(raw)
    assert error.code == "envelope_invalid"
    assert field in error.message


def test_missing_signature_is_invalid(raw):
    del raw["signature"]
    assert refusal(raw).code == "envelope_invalid"


@pytest.mark.parametrize("where", ["top", "envelope"])
def test_extra_field_is_invalid(raw, where):
    target = raw if where == "top" else raw["envelope"]
    target["priority"] = "high"
    error = refusal(raw)
    assert error.code == "envelope_invalid"
    assert "priority" in error.message


@pytest.mark.parametrize(
    ("field", "value"),
    [("attempt", "1"), ("issued_at", 1.5), ("v", 2), ("nonce", "0" * 31), ("args", [])],
)
def test_wrong_types_are_invalid(raw, field, value):
    raw["envelope"][field] = value
    assert refusal(raw).code == "envelope_invalid"


@pytest.mark.parametrize("signature", ["", "AAAA", "not base64!", "é" * 10])
def test_unsigned_or_garbage_signature_is_invalid(raw, signature):
    raw["signature"] = signature
    error = refusal(raw)
    assert error.code == "envelope_invalid"
    assert "signature" in error.message


# -- forged signatures -------------------------------------------------------------


def test_another_key_with_the_control_key_id_is_invalid():
    impostor, _ = ed25519("control", key_id=CONTROL.key_id)
    forged = make(signer=impostor).model_dump(mode="json")
    assert forged["envelope"]["key_id"] == CONTROL.key_id
    error = refusal(forged)
    assert error.code == "envelope_invalid"
    assert "does not verify" in error.message


def test_envelope_signed_by_a_tool_key_is_invalid():
    forged = make(signer=TOOL_SIGNER).model_dump(mode="json")
    error = refusal(forged)
    assert error.code == "envelope_invalid"
    assert "belongs to 'tool.x'" in error.message


def test_unknown_control_key_is_invalid():
    stranger, _ = ed25519("control")
    assert refusal(make(signer=stranger).model_dump(mode="json")).code == "envelope_invalid"


# -- the control's key, judged when the worker receives the job ---------------------

T = 1_800_000_000_000  # a fixed "now" (epoch ms): every time below is relative to it
GRACE_MS = int(RETIRED_KEY_GRACE.total_seconds() * 1000)


def control_key(**window: int) -> KeyRing:
    """The control's key with a window in epoch ms (not_after, revoked_at)."""
    return KeyRing(
        [
            PublicKey(
                key_id=CONTROL_KEY.key_id,
                owner="control",
                algorithm="ed25519",
                material=CONTROL_KEY.material,
                not_before=EPOCH,
                not_after=ms_to_datetime(window["not_after"]) if "not_after" in window else None,
                revoked_at=ms_to_datetime(window["revoked_at"]) if "revoked_at" in window else None,
            )
        ]
    )


def claiming(issued_at: int, lifetime_ms: int = 600_000) -> dict:
    """An envelope signed with the control's key that claims to be issued at ``issued_at``."""
    envelope = make().envelope.model_copy(
        update={"issued_at": issued_at, "expires_at": issued_at + lifetime_ms}
    )
    return resign(envelope)


def test_a_retired_key_verifies_jobs_in_flight_within_its_grace():
    """Rotation never breaks work in flight: signed before the rotation, received after."""
    keys = control_key(not_after=T)
    raw = claiming(T - 1_000, lifetime_ms=MAX_LIFETIME_MS)
    assert check(raw, keys=keys, now=T + 1_000).envelope.issued_at == T - 1_000
    assert check(raw, keys=keys, now=T - 1_000 + MAX_LIFETIME_MS - 1)


def test_a_retired_key_is_refused_after_its_grace_whatever_the_envelope_claims():
    keys = control_key(not_after=T)
    now = T + GRACE_MS
    for raw in (
        claiming(now),  # honest about its time
        claiming(T - 60_000, lifetime_ms=GRACE_MS + 600_000),  # backdated, lives on
        claiming(now - MAX_LIFETIME_MS + 1, lifetime_ms=MAX_LIFETIME_MS),  # within the bound
    ):
        error = refusal(raw, keys=keys, now=now)
        assert error.code == "envelope_invalid"
        assert "grace ended" in error.message and CONTROL_KEY.key_id in error.message
    assert check(claiming(now - 1), keys=keys, now=now - 1)  # one ms earlier: in the grace


def test_a_revoked_key_is_refused_from_its_revocation_on():
    keys = control_key(revoked_at=T)
    signed_before = claiming(T - 5_000)
    assert check(signed_before, keys=keys, now=T - 1)
    for now in (T, T + 1, T + 300_000):
        error = refusal(signed_before, keys=keys, now=now)  # signed before, received after
        assert error.code == "envelope_invalid"
        assert "revoked" in error.message and CONTROL_KEY.key_id in error.message
    backdated = claiming(T - 60_000)  # signed after the revocation, claiming before it
    assert "revoked" in refusal(backdated, keys=keys, now=T + 10).message


def test_a_revoked_key_has_no_grace_even_when_retired():
    keys = control_key(not_after=T - 60_000, revoked_at=T)
    assert "revoked" in refusal(claiming(T - 90_000), keys=keys, now=T).message


# -- the envelope's own claims: bounded lifetime, not from the future ---------------


def test_the_lifetime_bound_is_one_hour():
    assert MAX_ENVELOPE_LIFETIME_S == 3600 and MAX_LIFETIME_MS == 3_600_000


def test_an_envelope_living_longer_than_the_bound_is_invalid():
    assert check(claiming(T, lifetime_ms=MAX_LIFETIME_MS), now=T)
    for lifetime in (MAX_LIFETIME_MS + 1, 24 * MAX_LIFETIME_MS, 2**52):
        error = refusal(claiming(T, lifetime_ms=lifetime), now=T)
        assert error.code == "envelope_invalid"
        assert "envelope.expires_at" in error.message
        assert f"over the bound of {MAX_LIFETIME_MS} ms" in error.message
        assert "run_1/n1/1" in error.message


def test_a_backdated_envelope_that_lives_on_is_invalid_even_with_a_trusted_key():
    """Issued a day ago, expiring in ten minutes: its expiry alone would not stop it."""
    day = 24 * 3_600_000
    error = refusal(claiming(T - day, lifetime_ms=day + 600_000), now=T)
    assert error.code == "envelope_invalid" and "over the bound" in error.message


def test_an_envelope_issued_beyond_the_clock_skew_is_invalid():
    assert check(claiming(T + CLOCK_SKEW_MS), now=T)
    error = refusal(claiming(T + CLOCK_SKEW_MS + 1), now=T)
    assert error.code == "envelope_invalid"
    assert "envelope.issued_at" in error.message and "in the future" in error.message
    assert f"{CLOCK_SKEW_MS} ms" in error.message


# -- tampering ---------------------------------------------------------------------


def test_args_changed_after_signing_are_invalid(raw):
    raw["envelope"]["args"]["path"] = "../../etc/passwd"
    assert refusal(raw).code == "envelope_invalid"


def test_args_with_recomputed_hash_but_old_signature_are_invalid(raw):
    new_args = {"path": "../../etc/passwd"}
    raw["envelope"]["args"] = new_args
    raw["envelope"]["args_sha256"] = digest(new_args)
    error = refusal(raw)
    assert error.code == "envelope_invalid"
    assert "signature" in error.message


def test_signed_args_that_do_not_match_their_hash_are_invalid(signed):
    envelope = signed.envelope.model_copy(update={"args": {"path": "other.txt"}})
    error = refusal(resign(envelope))
    assert error.code == "envelope_invalid"
    assert "args_sha256" in error.message


@pytest.mark.parametrize("value", [math.nan, 2**60, 10**30])
def test_unrepresentable_args_are_invalid(raw, value):
    raw["envelope"]["args"]["extra"] = value
    assert refusal(raw).code == "envelope_invalid"


# -- the wrong tool or audience ----------------------------------------------------


def test_envelope_for_another_tool_is_invalid(raw):
    error = refusal(raw, tool="lint_python")
    assert error.code == "envelope_invalid"
    assert "tool.read_repo_file" in error.message


def test_audience_mismatch_is_invalid(signed):
    envelope = signed.envelope.model_copy(update={"audience": "tool.lint_python"})
    assert refusal(resign(envelope)).code == "envelope_invalid"
    assert refusal(resign(envelope), tool="lint_python").code == "envelope_invalid"


def test_tool_mismatch_with_matching_audience_is_invalid(signed):
    envelope = signed.envelope.model_copy(update={"tool": "lint_python"})
    assert refusal(resign(envelope)).code == "envelope_invalid"


# -- time --------------------------------------------------------------------------


def test_expiry(signed, raw):
    expires = signed.envelope.expires_at
    assert check(raw, now=expires - 1) == signed
    for now in (expires, expires + 1, expires + 10**9):
        error = refusal(raw, now=now)
        assert error.code == "envelope_expired"


def test_issued_in_the_future_is_invalid(signed, raw):
    issued = signed.envelope.issued_at
    assert check(raw, now=issued - CLOCK_SKEW_MS) == signed  # within the allowed skew
    error = refusal(raw, now=issued - CLOCK_SKEW_MS - 1)
    assert error.code == "envelope_invalid"
    assert "future" in error.message
    assert refusal(raw, now=issued - 3_600_000).code == "envelope_invalid"


def test_signed_far_future_envelope_is_invalid(signed):
    year = 365 * 24 * 3_600_000
    envelope = signed.envelope.model_copy(
        update={
            "issued_at": signed.envelope.issued_at + year,
            "expires_at": signed.envelope.expires_at + year,
        }
    )
    error = refusal(resign(envelope), now=signed.envelope.issued_at)
    assert error.code == "envelope_invalid"


def test_ttl_sets_expiry():
    signed = make(ttl_s=10)
    assert signed.envelope.expires_at - signed.envelope.issued_at == 10_000


# -- property-based tampering ------------------------------------------------------

# With a trace context, so that changing or removing it is a change too (docs/tracing.md).
_SIGNED = make(traceparent="00-" + "4b" * 16 + "-" + "a1" * 8 + "-01")
_RAW = _SIGNED.model_dump(mode="json")
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
PROPERTY = settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(index=st.integers(0, 63), mask=st.integers(1, 255))
def test_flipped_signature_bytes_never_verify(index, mask):
    raw = copy.deepcopy(_RAW)
    signature = bytearray(base64.b64decode(raw["signature"]))
    signature[index] ^= mask
    raw["signature"] = b64encode(bytes(signature))
    assert refusal(raw).code == "envelope_invalid"


# The last data character of an 88-character Ed25519 signature carries 4 unused bits
# that base64 decoding ignores; every other character carries signature bits.
@PROPERTY
@given(position=st.integers(0, 87).filter(lambda p: p != 85), char=st.characters())
def test_changed_signature_characters_never_verify(position, char):
    raw = copy.deepcopy(_RAW)
    signature = raw["signature"]
    assert len(signature) == 88
    assume(signature[position] != char)
    raw["signature"] = signature[:position] + char + signature[position + 1 :]
    assert refusal(raw).code == "envelope_invalid"


_FIELDS = sorted(Envelope.model_fields)
_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)


@PROPERTY
@given(field=st.sampled_from(_FIELDS), value=_values)
def test_changed_fields_never_verify(field, value):
    raw = copy.deepcopy(_RAW)
    old = raw["envelope"][field]
    assume(type(value) is not type(old) or value != old)
    # pydantic's strict Literal[1] still takes True and stores 1: the same envelope.
    assume(not (field == "v" and value is True))
    raw["envelope"][field] = value
    assert refusal(raw).code == "envelope_invalid"


@PROPERTY
@given(field=st.sampled_from(["args", "tool", "audience", "job_id", "expires_at"]), data=st.data())
def test_changed_fields_with_a_fresh_hash_never_verify(field, data):
    raw = copy.deepcopy(_RAW)
    old = raw["envelope"][field]
    if isinstance(old, dict):
        value = data.draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))
    elif isinstance(old, int):
        value = data.draw(st.integers(0, 2**50))
    else:
        value = data.draw(st.text(min_size=1, max_size=30))
    assume(value != old)
    raw["envelope"][field] = value
    raw["envelope"]["args_sha256"] = digest(raw["envelope"]["args"])
    assert refusal(raw).code == "envelope_invalid"


@PROPERTY
@given(_values)
def test_arbitrary_messages_are_refused_never_crash(value):
    assert refusal(value, now=0).code == "envelope_invalid"


# -- defects found and fixed: kept as regression tests --


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_null_arg_replaced_by_nan_is_refused(raw, value):
    assert raw["envelope"]["args"]["start_line"] is None
    raw["envelope"]["args"]["start_line"] = value
    assert refusal(raw).code == "envelope_invalid"


def test_deeply_nested_args_are_refused(raw):
    deep: object = 0
    for _ in range(300):
        deep = [deep]
    raw["envelope"]["args"]["deep"] = deep
    assert refusal(raw).code == "envelope_invalid"
