"""Signers, the verifying key ring, and the key store on disk."""

from __future__ import annotations

import base64
import json
import secrets
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from toolplane.errors import SettingsError, SignatureError, UnknownKeyError
from toolplane.keystore import KeyStore
from toolplane.lifetimes import CLOCK_SKEW_S, RETIRED_KEY_GRACE
from toolplane.signing import (
    Ed25519Signer,
    HmacSigner,
    KeyRing,
    PublicKey,
    b64encode,
    key_id_for,
)

EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
DATA = b'{"job":"run_1/n1/1"}'


def ed25519_key(owner: str, **window: datetime | None) -> tuple[Ed25519Signer, PublicKey]:
    private = Ed25519PrivateKey.generate()
    public = private.public_key().public_bytes_raw()
    key_id = key_id_for(owner, public)
    signer = Ed25519Signer(private_key=private, key_id=key_id, owner=owner)
    key = PublicKey(
        key_id=key_id,
        owner=owner,
        algorithm="ed25519",
        material=public,
        not_before=window.get("not_before") or EPOCH,
        not_after=window.get("not_after"),
        revoked_at=window.get("revoked_at"),
    )
    return signer, key


def hmac_key(owner: str, **window: datetime | None) -> tuple[HmacSigner, PublicKey]:
    secret = secrets.token_bytes(32)
    key_id = key_id_for(owner, secrets.token_bytes(16))
    signer = HmacSigner(secret=secret, key_id=key_id, owner=owner)
    key = PublicKey(
        key_id=key_id,
        owner=owner,
        algorithm="hmac-sha256",
        material=secret,
        not_before=window.get("not_before") or EPOCH,
        not_after=window.get("not_after"),
        revoked_at=window.get("revoked_at"),
    )
    return signer, key


MAKERS = {"ed25519": ed25519_key, "hmac-sha256": hmac_key}


@pytest.fixture(params=sorted(MAKERS))
def make_key(request):
    return MAKERS[request.param]


def verify(ring: KeyRing, signer, signature: str, **over):
    kwargs = {
        "key_id": signer.key_id,
        "algorithm": signer.algorithm,
        "data": DATA,
        "signature": signature,
        "owner": signer.owner,
        "received": NOW,
    }
    kwargs.update(over)
    return ring.verify(**kwargs)


# -- KeyRing.verify ----------------------------------------------------------------


def test_round_trip(make_key):
    signer, key = make_key("control")
    ring = KeyRing([key])
    assert verify(ring, signer, signer.sign(DATA)) is key


def test_key_id_names_the_owner_and_is_stable():
    _, key = ed25519_key("tool.read_repo_file")
    assert key.key_id.startswith("tool.read_repo_file:")
    assert key_id_for("control", key.material) == key_id_for("control", key.material)
    assert key_id_for("control", key.material) != key_id_for("tool.x", key.material)


@pytest.mark.parametrize("tampered", [DATA + b" ", DATA[:-1], DATA.replace(b"1", b"2"), b""])
def test_tampered_data_fails(make_key, tampered):
    signer, key = make_key("control")
    with pytest.raises(SignatureError, match="does not verify"):
        verify(KeyRing([key]), signer, signer.sign(DATA), data=tampered)


def test_wrong_owner_fails(make_key):
    signer, key = make_key("tool.read_repo_file")
    with pytest.raises(UnknownKeyError, match="belongs to 'tool.read_repo_file'"):
        verify(KeyRing([key]), signer, signer.sign(DATA), owner="control")


def test_unknown_key_id_fails(make_key):
    signer, key = make_key("control")
    other_signer, _ = make_key("control")
    with pytest.raises(UnknownKeyError, match="unknown key id") as info:
        verify(KeyRing([key]), other_signer, other_signer.sign(DATA))
    assert info.value.key_id == other_signer.key_id
    with pytest.raises(UnknownKeyError):
        verify(KeyRing(), signer, signer.sign(DATA))


def test_same_key_id_with_another_key_fails(make_key):
    signer, key = make_key("control")
    impostor, _ = make_key("control")
    forged = impostor.sign(DATA)
    with pytest.raises(SignatureError, match="does not verify"):
        verify(KeyRing([key]), signer, forged)


def test_algorithm_mismatch_fails():
    signer, key = ed25519_key("control")
    with pytest.raises(SignatureError, match="signature claims hmac-sha256"):
        verify(KeyRing([key]), signer, signer.sign(DATA), algorithm="hmac-sha256")
    hsigner, hkey = hmac_key("control")
    with pytest.raises(SignatureError, match="signature claims ed25519"):
        verify(KeyRing([hkey]), hsigner, hsigner.sign(DATA), algorithm="ed25519")


def test_public_key_used_as_hmac_secret_is_refused():
    # Algorithm confusion: the Ed25519 public key is known to everyone.
    signer, key = ed25519_key("control")
    forger = HmacSigner(secret=key.material, key_id=key.key_id, owner="control")
    with pytest.raises(SignatureError):
        verify(KeyRing([key]), signer, forger.sign(DATA), algorithm="hmac-sha256")
    with pytest.raises(SignatureError):
        verify(KeyRing([key]), signer, forger.sign(DATA), algorithm="ed25519")


def test_a_key_is_trusted_from_its_not_before_less_the_clock_skew(make_key):
    skew = timedelta(seconds=CLOCK_SKEW_S)
    signer, key = make_key("control", not_before=NOW + skew + timedelta(milliseconds=1))
    with pytest.raises(UnknownKeyError, match="not valid before") as info:
        verify(KeyRing([key]), signer, signer.sign(DATA))
    assert info.value.key_id == key.key_id
    assert verify(
        KeyRing([key]), signer, signer.sign(DATA), received=NOW + timedelta(milliseconds=1)
    )


def test_a_retired_key_verifies_what_arrives_within_its_grace_and_nothing_after(make_key):
    signer, key = make_key("control", not_before=EPOCH, not_after=NOW)
    ring = KeyRing([key])
    signature = signer.sign(DATA)
    end = NOW + RETIRED_KEY_GRACE
    for received in (NOW - timedelta(days=1), NOW, end - timedelta(microseconds=1)):
        assert verify(ring, signer, signature, received=received) is key
    for received in (end, end + timedelta(days=365)):
        with pytest.raises(UnknownKeyError, match="grace ended") as info:
            verify(ring, signer, signature, received=received)
        assert info.value.key_id == key.key_id
        assert end.isoformat() in str(info.value)


def test_the_grace_covers_the_longest_job_in_flight():
    """An envelope lives an hour at most, its tool runs within that, its result is due 10 s
    later, and the clocks may be 30 s apart: two hours and 40 seconds."""
    assert RETIRED_KEY_GRACE == timedelta(hours=2, seconds=40)


def test_a_revoked_key_verifies_nothing_received_from_its_revocation_on(make_key):
    signer, key = make_key("tool.x", not_before=EPOCH, revoked_at=NOW)
    ring = KeyRing([key])
    signature = signer.sign(DATA)  # signed before the revocation, whatever it claims
    assert verify(ring, signer, signature, received=NOW - timedelta(microseconds=1)) is key
    for received in (NOW, NOW + timedelta(microseconds=1), NOW + timedelta(days=30)):
        with pytest.raises(UnknownKeyError, match="was revoked at") as info:
            verify(ring, signer, signature, received=received)
        assert info.value.key_id == key.key_id


def test_a_revoked_retired_key_has_no_grace_left(make_key):
    retired = NOW - timedelta(minutes=10)
    signer, key = make_key("control", not_before=EPOCH, not_after=retired, revoked_at=NOW)
    assert verify(KeyRing([key]), signer, signer.sign(DATA), received=NOW - timedelta(seconds=1))
    with pytest.raises(UnknownKeyError, match="revoked"):
        verify(KeyRing([key]), signer, signer.sign(DATA), received=NOW)


def test_merged_keeps_the_earliest_retirement_and_revocation():
    _, key = ed25519_key("control", not_after=NOW, revoked_at=NOW)
    later, earlier = NOW + timedelta(hours=1), NOW - timedelta(hours=1)
    assert key.merged(not_after=later, revoked_at=later) == key
    assert key.merged(not_after=None, revoked_at=None) == key
    both = key.merged(not_after=earlier, revoked_at=earlier)
    assert (both.not_after, both.revoked_at) == (earlier, earlier)
    _, fresh = ed25519_key("control")
    assert fresh.merged(not_after=None, revoked_at=NOW).revoked_at == NOW


def test_with_key_leaves_the_ring_it_came_from_alone():
    signer, key = ed25519_key("control")
    ring = KeyRing([key])
    revoked = key.merged(not_after=None, revoked_at=NOW)
    other = ring.with_key(revoked)
    assert ring.get(key.key_id) is key and other.get(key.key_id) is revoked
    assert verify(ring, signer, signer.sign(DATA))
    with pytest.raises(UnknownKeyError, match="revoked"):
        verify(other, signer, signer.sign(DATA))


@pytest.mark.parametrize(
    "garbage",
    ["not base64 !!", "é", "QUJD\n", "QUJ", "====", "QQ==QQ==", "\x00", "A" * 199 + "!"],
)
def test_malformed_base64_signature_is_a_signature_error(make_key, garbage):
    signer, key = make_key("control")
    with pytest.raises(SignatureError):
        verify(KeyRing([key]), signer, garbage)


@pytest.mark.parametrize("length", [0, 1, 32, 63, 65, 128])
def test_signature_of_the_wrong_length_fails(make_key, length):
    signer, key = make_key("control")
    with pytest.raises(SignatureError, match="does not verify"):
        verify(KeyRing([key]), signer, b64encode(b"\x01" * length))


def test_malformed_public_key_material_is_a_signature_error():
    signer, key = ed25519_key("control")
    broken = PublicKey(
        key_id=key.key_id,
        owner=key.owner,
        algorithm="ed25519",
        material=b"short",
        not_before=EPOCH,
    )
    with pytest.raises(SignatureError):
        verify(KeyRing([broken]), signer, signer.sign(DATA))


_ED = ed25519_key("control")
_HM = hmac_key("control")


@settings(deadline=None, max_examples=200)
@given(
    which=st.sampled_from([_ED, _HM]),
    index=st.integers(min_value=0),
    mask=st.integers(min_value=1, max_value=255),
)
def test_flipped_signature_bytes_never_verify(which, index, mask):
    signer, key = which
    raw = bytearray(base64.b64decode(signer.sign(DATA)))
    raw[index % len(raw)] ^= mask
    with pytest.raises(SignatureError):
        verify(KeyRing([key]), signer, b64encode(bytes(raw)))


@settings(deadline=None, max_examples=200)
@given(which=st.sampled_from([_ED, _HM]), data=st.binary(max_size=200))
def test_signature_over_other_data_never_verifies(which, data):
    signer, key = which
    assume(data != DATA)
    with pytest.raises(SignatureError):
        verify(KeyRing([key]), signer, signer.sign(data))


@settings(deadline=None, max_examples=200)
@given(which=st.sampled_from([_ED, _HM]), garbage=st.text(max_size=120))
def test_arbitrary_signature_text_is_refused_cleanly(which, garbage):
    signer, key = which
    with pytest.raises(SignatureError):
        verify(KeyRing([key]), signer, garbage)


def test_key_ring_collection():
    _, a = ed25519_key("control")
    _, b = hmac_key("tool.x")
    ring = KeyRing([a])
    ring.add(b)
    assert len(ring) == 2
    assert set(ring) == {a, b}
    assert ring.get(a.key_id) is a
    assert ring.get("nope") is None


# -- KeyStore ----------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path / "keys")


def private_files(store: KeyStore) -> list[Path]:
    return sorted(store.private_dir.iterdir())


def private_files_of(store: KeyStore, owner: str) -> Path:
    (entry,) = [e for e in store.entries() if e["owner"] == owner and e["not_after"] is None]
    return store._private_path(entry["key_id"])


def test_ensure_creates_once(store):
    assert store.ensure("control", "ed25519") is True
    assert store.ensure("control", "ed25519") is False
    assert store.ensure("control", "hmac-sha256") is False
    assert [e["owner"] for e in store.entries()] == ["control"]
    assert len(private_files(store)) == 1
    assert store.ensure("tool.x", "hmac-sha256") is True
    assert store.owners() == {"control", "tool.x"}


def test_private_files_are_owner_only(store):
    store.ensure("control", "ed25519")
    store.ensure("tool.x", "hmac-sha256")
    files = private_files(store)
    assert len(files) == 2
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(store.private_dir.stat().st_mode) & 0o077 == 0


def test_index_holds_no_secret_material(store):
    store.ensure("control", "ed25519")
    store.ensure("tool.x", "hmac-sha256")
    index = store.index_path.read_text()
    for path in private_files(store):
        secret_b64 = path.read_text().strip()
        raw = base64.b64decode(secret_b64)
        assert secret_b64 not in index
        assert raw.hex() not in index
        assert base64.urlsafe_b64encode(raw).decode() not in index
    entries = json.loads(index)["keys"]
    by_owner = {e["owner"]: e for e in entries}
    assert by_owner["tool.x"]["public"] is None
    control_secret = Ed25519PrivateKey.from_private_bytes(
        base64.b64decode(store._private_path(by_owner["control"]["key_id"]).read_text())
    )
    public = control_secret.public_key().public_bytes_raw()
    assert base64.b64decode(by_owner["control"]["public"]) == public
    assert by_owner["control"]["key_id"] == key_id_for("control", public)
    for entry in entries:
        assert set(entry) == {"key_id", "owner", "algorithm", "public", "not_before", "not_after"}


@pytest.mark.parametrize("algorithm", ["ed25519", "hmac-sha256"])
def test_signer_signs_and_public_keys_verify(store, algorithm):
    store.ensure("tool.x", algorithm)
    signer = store.signer("tool.x")
    assert signer.algorithm == algorithm
    assert signer.owner == "tool.x"
    ring = KeyRing(store.public_keys(with_secrets=True))
    key = verify(ring, signer, signer.sign(DATA), received=datetime.now(UTC))
    assert key.key_id == signer.key_id
    # A second store over the same directory sees the same key.
    again = KeyStore(store.dir).signer("tool.x")
    assert again.key_id == signer.key_id
    assert again.sign(DATA) == signer.sign(DATA)  # Ed25519 and HMAC are deterministic


def test_signer_of_unknown_owner_is_a_settings_error(store):
    with pytest.raises(SettingsError, match="no active key for 'control'"):
        store.signer("control")
    store.ensure("tool.x", "ed25519")
    with pytest.raises(SettingsError):
        store.signer("control")


def test_public_keys_filters_by_owner(store):
    store.ensure("control", "ed25519")
    store.ensure("tool.a", "ed25519")
    assert {k.owner for k in store.public_keys()} == {"control", "tool.a"}
    assert {k.owner for k in store.public_keys(["tool.a"])} == {"tool.a"}
    assert store.public_keys([]) == []


def test_hmac_keys_are_listed_only_with_secrets(store):
    store.ensure("control", "ed25519")
    store.ensure("tool.x", "hmac-sha256")
    assert {k.owner for k in store.public_keys()} == {"control"}
    with_secrets = {k.owner: k for k in store.public_keys(with_secrets=True)}
    assert set(with_secrets) == {"control", "tool.x"}
    secret = base64.b64decode(private_files_of(store, "tool.x").read_text())
    assert with_secrets["tool.x"].material == secret
    assert with_secrets["tool.x"].algorithm == "hmac-sha256"


@pytest.mark.parametrize("algorithm", ["ed25519", "hmac-sha256"])
def test_rotation_keeps_work_in_flight_verifiable_for_the_grace(store, algorithm):
    store.ensure("tool.x", algorithm)
    old = store.signer("tool.x")
    old_signature = old.sign(DATA)

    new_id = store.rotate("tool.x", algorithm)
    assert new_id != old.key_id
    new = store.signer("tool.x")
    assert new.key_id == new_id
    assert store.ensure("tool.x", algorithm) is False

    ring = KeyRing(store.public_keys(with_secrets=True))
    assert len(ring) == 2
    closed = ring.get(old.key_id)
    assert closed is not None and closed.not_after is not None
    retired = closed.not_after
    # What the old key signed verifies when it arrives within the grace after the rotation.
    end = retired + RETIRED_KEY_GRACE
    assert verify(ring, old, old_signature, received=retired).key_id == old.key_id
    assert verify(ring, old, old_signature, received=end - timedelta(microseconds=1))
    # And nothing it signs (or signed) arrives in time after that, whatever it claims.
    with pytest.raises(UnknownKeyError, match="grace ended"):
        verify(ring, old, old.sign(DATA), received=end)
    # The new key verifies from its creation on (less the clock skew), not before.
    new_key = ring.get(new_id)
    assert new_key is not None and new_key.not_after is None
    assert verify(ring, new, new.sign(DATA), received=end).key_id == new_id
    before = new_key.not_before - timedelta(seconds=CLOCK_SKEW_S + 1)
    with pytest.raises(UnknownKeyError, match="not valid before"):
        verify(ring, new, new.sign(DATA), received=before)


def test_rotation_of_one_owner_leaves_others_alone(store):
    store.ensure("control", "ed25519")
    store.ensure("tool.x", "ed25519")
    control_id = store.signer("control").key_id
    store.rotate("tool.x", "ed25519")
    assert store.signer("control").key_id == control_id
    assert [e["not_after"] for e in store.entries() if e["owner"] == "control"] == [None]
