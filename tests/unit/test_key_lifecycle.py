"""A key's life in the key store and in a worker: revoked for good, seen at the next job.

The clock is never waited on: every revocation is given its time.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from control.errors import UsageError
from control.governance.keys import _ceil_ms
from control.orchestration.dispatch import envelope_ttl_s, sign_envelope
from sandbox_tasks.executor import Outcome
from sandbox_tasks.keys import KeyStoreKeys
from sandbox_tasks.registry import ToolContext
from sandbox_tasks.worker import WorkerDeps, handle_job
from tests.fixture_tools import TOOLS
from toolplane.errors import SettingsError
from toolplane.keystore import IndexWatch, KeyStore
from toolplane.lifetimes import MAX_ENVELOPE_LIFETIME_S
from toolplane.messages import ms_to_datetime, now_ms
from toolplane.settings import Settings

SLEEPY = next(t for t in TOOLS if t.name == "sleepy")
AN_HOUR_AGO = datetime.now(UTC) - timedelta(hours=1)


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    keys = KeyStore(tmp_path / "keys")
    keys.ensure_all(["sleepy"], receipt_algorithm="ed25519")
    return keys


def active_id(store: KeyStore, owner: str) -> str:
    return store.signer(owner).key_id


# -- the key store ----------------------------------------------------------------------


def test_a_revocation_is_recorded_with_its_reason_and_keeps_the_earliest(store):
    key_id = active_id(store, "tool.sleepy")
    assert store.record_revocation(key_id, revoked_at=AN_HOUR_AGO, reason="leaked") is True
    later = AN_HOUR_AGO + timedelta(minutes=5)
    assert store.record_revocation(key_id, revoked_at=later, reason="again") is False
    entry = store.entry(key_id)
    assert entry is not None
    assert (entry["revoked_at"], entry["revoked_reason"]) == (AN_HOUR_AGO.isoformat(), "leaked")
    earlier = AN_HOUR_AGO - timedelta(minutes=5)
    assert store.record_revocation(key_id, revoked_at=earlier, reason="found earlier") is True
    assert store.entry(key_id)["revoked_at"] == earlier.isoformat()
    assert store.record_revocation("tool.sleepy:nope", revoked_at=later, reason="x") is False
    (key,) = [k for k in store.public_keys() if k.key_id == key_id]
    assert key.revoked_at == earlier


def test_a_revoked_key_never_signs_and_rotation_keeps_its_revocation(store):
    key_id = active_id(store, "control")
    store.record_revocation(key_id, revoked_at=AN_HOUR_AGO, reason="leaked")
    with pytest.raises(SettingsError, match="no active key for 'control'"):
        store.signer("control")
    assert store.ensure("control", "ed25519") is True  # `up` gives the owner a key again
    new_id = store.rotate("control", "ed25519")
    assert store.signer("control").key_id == new_id
    entry = store.entry(key_id)
    assert entry["revoked_at"] == AN_HOUR_AGO.isoformat() and entry["not_after"] is not None


@pytest.mark.parametrize(
    "index", ["{", "[]", '{"keys": 5}', '{"keys": [1]}', '{"other": []}', "\x00"]
)
def test_a_malformed_index_is_a_settings_error_naming_it(store, index):
    store.index_path.write_text(index)
    with pytest.raises(SettingsError, match="malformed") as info:
        store.entries()
    assert str(store.index_path) in str(info.value)


def test_an_index_watch_builds_again_only_when_the_index_changes(store):
    built: list[int] = []

    def build(s: KeyStore) -> int:
        built.append(len(s.entries()))
        return len(built)

    watch = IndexWatch(store, build)
    assert watch.changed() and watch.get() == 1
    assert watch.get() == 1 and not watch.changed() and built == [2]
    store.rotate("tool.sleepy", "ed25519")
    assert watch.changed() and watch.get() == 2 and built == [2, 3]
    store.index_path.write_text("{")
    with pytest.raises(SettingsError):
        watch.get()
    with pytest.raises(SettingsError):  # and again: never a stale value after a failed read
        watch.get()
    store.index_path.unlink()
    assert watch.get() == 3 and built == [2, 3, 0]  # an absent index: no keys


# -- a worker: revocations are seen at the next job, without a restart ------------------


class MemoryClaims:
    def __init__(self) -> None:
        self.ran: list[str] = []

    def acquire(self, job_id: str, *, lease_ms: int) -> Any:
        from sandbox_tasks.claims import Claim, ClaimState

        self.ran.append(job_id)
        return Claim(ClaimState.ACQUIRED, job_id, "t")

    def done(self, job_id: str) -> bool:
        return False


class Instant:
    containment = "none (unit test)"

    def run(self, spec: Any, args: Any, ctx: Any, *, tenant: str) -> Outcome:
        return Outcome(True, {"slept": 0.0, "pid": 1})


def worker(store: KeyStore, tmp_path: Path) -> WorkerDeps:
    return WorkerDeps(
        spec=SLEEPY,
        keys=KeyStoreKeys(store, owner="tool.sleepy"),
        claims=MemoryClaims(),  # type: ignore[arg-type]
        executor=Instant(),
        context=ToolContext(repo_root=tmp_path, docs_root=tmp_path, scratch_dir=tmp_path),
        worker_name="sleepy@test",
    )


def job(store: KeyStore, node: str) -> dict:
    return sign_envelope(
        signer=store.signer("control"),
        run_id="run_1",
        node_id=node,
        attempt=1,
        tenant="acme",
        principal="alice",
        tool="sleepy",
        args={"seconds": 0},
        decision_id="d",
        policy_version="v",
        ttl_s=600,
    ).model_dump(mode="json")


def test_a_worker_sees_a_revocation_of_the_control_key_at_its_next_job(store, tmp_path):
    deps = worker(store, tmp_path)
    control = active_id(store, "control")
    first, second = job(store, "a"), job(store, "b")  # both signed before the revocation
    assert handle_job(first, deps).kind == "result"
    store.record_revocation(control, revoked_at=ms_to_datetime(now_ms()), reason="leaked")
    refused = handle_job(second, deps)  # the same worker, not restarted
    assert refused.kind == "refusal" and refused.error is not None
    assert refused.error.code == "envelope_invalid"
    assert "revoked" in refused.error.message and control in refused.error.message
    assert deps.claims.ran == ["run_1/a/1"]  # type: ignore[attr-defined]


def test_a_worker_trusts_a_new_control_key_at_its_next_job(store, tmp_path):
    deps = worker(store, tmp_path)
    store.rotate("control", "ed25519")
    assert handle_job(job(store, "a"), deps).kind == "result"


def test_a_worker_refuses_every_job_while_its_key_index_is_unreadable(store, tmp_path):
    deps = worker(store, tmp_path)
    signed = job(store, "a")
    store.index_path.write_text('{"keys": ')
    refused = handle_job(signed, deps)
    assert refused.kind == "refusal" and refused.error is not None
    assert refused.error.code == "envelope_invalid"
    assert "control's keys" in refused.error.message and "malformed" in refused.error.message
    assert deps.claims.ran == []  # type: ignore[attr-defined]


def test_a_worker_signs_with_its_tool_key_as_of_now(store, tmp_path, caplog):
    keys = KeyStoreKeys(store, owner="tool.sleepy")
    old = keys.signer().key_id
    new = store.rotate("tool.sleepy", "ed25519")
    assert keys.signer().key_id == new
    # A key whose private file is not here (a container given the old key only): the
    # worker keeps the key it has, and says so once.
    newer = store.rotate("tool.sleepy", "ed25519")
    store._private_path(newer).unlink()
    with caplog.at_level(logging.WARNING, logger="toolplane.worker"):
        assert keys.signer().key_id == new
        assert keys.signer().key_id == new
    stale = [r for r in caplog.records if "keys.signer_stale" in r.getMessage()]
    assert len(stale) == 1 and new in stale[0].getMessage()
    assert old != new


# -- the bound on an envelope's life, where the control computes it ---------------------


def test_the_control_never_signs_an_envelope_over_the_bound():
    assert envelope_ttl_s(visibility_timeout=30, tool_timeout_s=3500, queue_wait_s=70) == 3600
    with pytest.raises(UsageError, match="over the bound of 3600 s") as info:
        envelope_ttl_s(visibility_timeout=30, tool_timeout_s=3501, queue_wait_s=70)
    assert info.value.field == "timeout_s"


def test_settings_leave_room_for_a_tool_within_the_bound(tmp_path):
    Settings(home=tmp_path, queue_wait_s=1800, visibility_timeout=1799)
    with pytest.raises(ValidationError, match="queue_wait_s .* visibility_timeout"):
        Settings(home=tmp_path, queue_wait_s=1800, visibility_timeout=1800)
    assert MAX_ENVELOPE_LIFETIME_S == 3600


def test_a_worker_whose_tool_cannot_fit_in_the_bound_does_not_start(tmp_path):
    from sandbox_tasks.main import build_deps

    settings = Settings(
        home=tmp_path, queue_wait_s=1800, visibility_timeout=1795, extra_tools="tests.fixture_tools"
    )
    with pytest.raises(SettingsError, match=r"live 3603 s, over the bound of 3600 s"):
        build_deps(settings, "sleepy", broker_url="redis://127.0.0.1:1/0")


def test_a_revocation_time_is_rounded_up_to_the_millisecond():
    at = datetime(2026, 12, 8, 12, 0, 0, 123_001, tzinfo=UTC)
    assert _ceil_ms(at) == datetime(2026, 12, 8, 12, 0, 0, 124_000, tzinfo=UTC)
    whole = datetime(2026, 12, 8, 12, 0, 0, 123_000, tzinfo=UTC)
    assert _ceil_ms(whole) == whole
    last = datetime(2026, 12, 8, 12, 0, 0, 999_999, tzinfo=UTC)
    assert _ceil_ms(last) == datetime(2026, 12, 8, 12, 0, 1, tzinfo=UTC)
