"""What ingest keeps of an unverified message (control.orchestration.unverified.keep)."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from control.orchestration.ingest import _claimed, _receipt_key_id, _text
from control.orchestration.unverified import MESSAGE_CAP, keep
from toolplane.canonical import canonical_json, check_json_value, contains_nul, digest


def test_a_small_message_is_kept_whole_under_its_canonical_digest() -> None:
    raw = {"result": {"run_id": "run_x"}, "receipt": None}
    kept = keep(raw)
    assert kept.message == raw
    assert kept.sha256 == digest(raw) and kept.size == len(canonical_json(raw))


def test_a_large_message_keeps_its_first_bytes_its_size_and_digest() -> None:
    raw = {"result": {"filler": "é" * 100_000}}
    kept = keep(raw)
    assert kept.size == len(canonical_json(raw)) > MESSAGE_CAP
    assert kept.sha256 == digest(raw)
    assert kept.message["truncated"] is True
    assert len(kept.message["head"].encode()) <= MESSAGE_CAP
    assert canonical_json(raw).decode().startswith(kept.message["head"])


def test_what_the_ledger_cannot_store_is_kept_as_escaped_text() -> None:
    nul = keep({"a": "x\x00"})
    assert nul.message == {"head": '{"a":"x\\u0000"}', "truncated": False}
    surrogate = keep({"a": "\ud800"})  # JSON can carry it as an escape; no column takes it
    assert surrogate.sha256 == hashlib.sha256(repr({"a": "\ud800"}).encode()).hexdigest()
    assert surrogate.message["head"] == "{'a': '\\ud800'}"


@given(
    st.recursive(st.text() | st.integers() | st.none(), lambda c: st.lists(c, max_size=4))
    | st.text(min_size=4000)
)
def test_whatever_arrives_is_kept_storably_and_capped(raw: object) -> None:
    kept = keep(raw)
    check_json_value(kept.message)
    assert not contains_nul(kept.message)
    if kept.message is raw:  # whole: its canonical JSON fits
        assert kept.size == len(canonical_json(raw)) <= MESSAGE_CAP
    else:
        assert len(kept.message["head"].encode()) <= MESSAGE_CAP
        assert kept.message["truncated"] is (kept.size > MESSAGE_CAP)


def test_claims_are_short_storable_strings_or_none() -> None:
    raw = {
        "result": {"run_id": "r" * 201, "node_id": "n\x00", "attempt": True, "tool": "\udfff"},
        "receipt": {"key_id": "k\ud800"},
    }
    assert _claimed(raw) == {"run_id": None, "node_id": None, "attempt": None, "tool": None}
    assert _receipt_key_id(raw) is None
    assert _receipt_key_id({"receipt": {"key_id": "tool.x:1"}}) == "tool.x:1"
    assert _text("a\x00\ud800", 10) == "a\\x00\\ud800"
