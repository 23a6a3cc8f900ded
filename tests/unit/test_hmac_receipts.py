"""HMAC-SHA256 receipts, selectable per tool beside Ed25519, in memory: keys, rotation, and
the offline bundle check (which names an HMAC receipt it cannot check without the secret)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from control.cli import app
from control.cli.bundles import read_hmac_secrets
from control.errors import EXIT_USAGE, UsageError
from control.orchestration.dispatch import sign_envelope
from ledger.bundle_check import BUNDLE_FORMAT, check_bundle, key_to_json
from ledger.checkpoint import Checkpoint
from ledger.leaf import event_leaf
from ledger.merkle import leaf_hash, root_from_leaves
from ledger.note import NoteSigner, generate_signer, sign_note
from ledger.receipts import ReceiptProblem, check_result_message
from sandbox_tasks.receipts import build_result, sign_result
from toolplane.canonical import canonical_json
from toolplane.keystore import KeyStore
from toolplane.lifetimes import RETIRED_KEY_GRACE
from toolplane.settings import Settings
from toolplane.signing import KeyRing


def signed(store: KeyStore) -> dict:
    result = build_result(
        kind="result",
        tool="lint_python",
        worker="w@h",
        started_at=1,
        envelope=None,
        envelope_sha256=None,
        result={"findings": []},
        containment="fork-rlimits",
    )
    return sign_result(result, store.signer("tool.lint_python")).model_dump(mode="json")


def test_hmac_receipts_verify_with_the_shared_secret_only(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    assert store.ensure_all(["lint_python"], receipt_algorithm="hmac-sha256") == [
        "control",
        "tool.lint_python",
    ]
    message = signed(store)
    assert message["receipt"]["algorithm"] == "hmac-sha256"
    now = datetime.now(UTC)
    check_result_message(message, KeyRing(store.public_keys(with_secrets=True)), received=now)
    with pytest.raises(ReceiptProblem, match="unknown key"):  # public keys alone cannot verify HMAC
        check_result_message(message, KeyRing(store.public_keys()), received=now)
    message["result"]["result"] = {"findings": [{"code": "X"}]}
    with pytest.raises(ReceiptProblem):
        check_result_message(message, KeyRing(store.public_keys(with_secrets=True)), received=now)


# -- per-tool selection ------------------------------------------------------------


def test_receipt_algorithms_choose_each_tools_kind_beside_the_default(tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path, receipt_algorithm="ed25519", receipt_algorithms="lint_python=hmac-sha256"
    )
    assert settings.receipt_algorithm_for("lint_python") == "hmac-sha256"
    assert settings.receipt_algorithm_for("search_docs") == "ed25519"
    store = KeyStore(tmp_path / "keys")
    store.ensure_all(
        ["lint_python", "search_docs"],
        receipt_algorithm=settings.receipt_algorithm,
        per_tool=settings.tool_receipt_algorithms,
    )
    kinds = {e["owner"]: e["algorithm"] for e in store.entries()}
    assert kinds == {
        "control": "ed25519",
        "tool.lint_python": "hmac-sha256",
        "tool.search_docs": "ed25519",
    }
    assert store.signer("tool.lint_python").algorithm == "hmac-sha256"


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("lint_python", "expected TOOL=ALGORITHM"),
        ("lint_python=rsa", "must be one of ed25519, hmac-sha256"),
        ("a=ed25519,a=hmac-sha256", "'a' is named twice"),
        ("=ed25519", "expected TOOL=ALGORITHM"),
    ],
)
def test_bad_receipt_algorithms_are_refused_naming_the_rule(
    tmp_path: Path, value: str, rule: str
) -> None:
    with pytest.raises(ValidationError, match="receipt_algorithms") as e:
        Settings(home=tmp_path, receipt_algorithms=value)
    assert rule in str(e.value)


def test_a_rotated_hmac_key_signs_nothing_new_and_its_receipts_still_verify(
    tmp_path: Path,
) -> None:
    store = KeyStore(tmp_path)
    store.ensure_all([], receipt_algorithm="ed25519", per_tool={})
    store.ensure("tool.lint_python", "hmac-sha256")
    old = store.signer("tool.lint_python")
    before = signed(store)
    new_id = store.rotate("tool.lint_python", "hmac-sha256")
    assert store.signer("tool.lint_python").key_id == new_id != old.key_id
    after = signed(store)
    assert after["receipt"]["key_id"] == new_id
    ring = KeyRing(store.public_keys(with_secrets=True))
    now = datetime.now(UTC)
    check_result_message(before, ring, received=now)  # within the retired key's grace
    check_result_message(after, ring, received=now)
    with pytest.raises(ReceiptProblem, match="grace ended"):  # signed by it later: refused
        check_result_message(before, ring, received=now + RETIRED_KEY_GRACE + timedelta(1))


# -- offline bundles -----------------------------------------------------------------


def bundle(store: KeyStore, *, bound: bool = True) -> tuple[bytes, NoteSigner]:
    """A run's bundle by hand: a dispatch and its completion (an HMAC receipt), in a tree of
    two leaves, under a signed checkpoint."""
    signed_envelope = sign_envelope(
        signer=store.signer("control"),
        run_id="run_1",
        node_id="lint",
        attempt=1,
        tenant="tn_1",
        principal="p",
        tool="lint_python",
        args={"path": "a.py"},
        decision_id="d",
        policy_version="v",
        ttl_s=600,
    )
    result = build_result(
        kind="result",
        tool="lint_python",
        worker="w@h",
        started_at=1,
        envelope=signed_envelope.envelope,
        envelope_sha256=signed_envelope.digest if bound else "0" * 64,
        result={"findings": []},
        containment="fork-rlimits",
    )
    message = sign_result(result, store.signer("tool.lint_python")).model_dump(mode="json")
    common = {"chain_id": "tenant:tn_1", "tenant_id": "tn_1", "run_id": "run_1"}
    now = datetime.now(UTC)
    leaves = [
        event_leaf(
            **common,
            seq=1,
            prev_hash="0" * 64,
            kind="ToolCallDispatched",
            created_at=now,
            payload={
                "node_id": "lint",
                "attempt": 1,
                "envelope": signed_envelope.model_dump(mode="json"),
                "envelope_sha256": signed_envelope.digest,
            },
        ),
        event_leaf(
            **common,
            seq=2,
            prev_hash="1" * 64,
            kind="ToolCallCompleted",
            created_at=now,
            payload={"node_id": "lint", "attempt": 1, "message": message},
        ),
    ]
    hashes = [leaf_hash(leaf) for leaf in leaves]
    signer = generate_signer("toolplane.local")
    checkpoint = Checkpoint(
        origin="toolplane.local/tenant/tn_1", size=2, root=root_from_leaves(hashes)
    )
    b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    data = canonical_json(
        {
            "format": BUNDLE_FORMAT,
            "run_id": "run_1",
            "checkpoint": sign_note(checkpoint.text(), [signer]),
            "events": [
                {"seq": 1, "leaf": b64(leaves[0]), "proof": [b64(hashes[1])]},
                {"seq": 2, "leaf": b64(leaves[1]), "proof": [b64(hashes[0])]},
            ],
            "keys": [key_to_json(k) for k in store.public_keys(["control"])],
        }
    )
    return data, signer


def test_a_bundle_names_hmac_receipts_unverifiable_and_checks_them_with_the_secret(
    tmp_path: Path,
) -> None:
    store = KeyStore(tmp_path)
    store.ensure_all(["lint_python"], receipt_algorithm="hmac-sha256")
    data, signer = bundle(store)
    key_id = store.signer("tool.lint_python").key_id
    secret = store.signer("tool.lint_python").secret  # type: ignore[attr-defined]

    report = check_bundle(data, [signer.verifier])
    assert report.ok and report.receipts == 0 and report.envelopes == 1, report.problems
    assert report.unverifiable == ["events[1]"]
    assert any(
        n.startswith("events[1].receipt: HMAC-SHA256 receipt of tool lint_python")
        and "not verifiable by a third party without the secret" in n
        for n in report.notes
    ), report.notes

    for name in ("lint_python", key_id):
        report = check_bundle(data, [signer.verifier], hmac_secrets={name: [secret]})
        assert report.ok and report.receipts == 1 and report.unverifiable == [], report.problems
    report = check_bundle(data, [signer.verifier], hmac_secrets={"other_tool": [secret]})
    assert report.ok and report.unverifiable == ["events[1]"]

    wrong = check_bundle(data, [signer.verifier], hmac_secrets={"lint_python": [b"x" * 32]})
    assert not wrong.ok and wrong.receipts == 0
    (problem,) = wrong.problems
    assert problem.startswith(
        f"events[1].receipt: HMAC-SHA256 receipt of tool lint_python (key {key_id})"
    )
    assert "signature does not verify" in problem
    # one of several secrets given for a tool (before and after a rotation) is enough
    several = check_bundle(
        data, [signer.verifier], hmac_secrets={"lint_python": [b"x" * 32, secret]}
    )
    assert several.ok and several.receipts == 1


def test_an_unverifiable_hmac_receipt_is_still_checked_for_its_binding(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    store.ensure_all(["lint_python"], receipt_algorithm="hmac-sha256")
    data, signer = bundle(store, bound=False)
    report = check_bundle(data, [signer.verifier])
    assert not report.ok
    assert report.problems == [
        "events[1].receipt: not bound to the envelope dispatched for node lint attempt 1"
    ]


# -- the operator's and the auditor's commands ----------------------------------------


def keys_cli(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, ["keys", *args])


def test_keys_rotate_makes_the_configured_kind_or_the_one_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOOLPLANE_HOME", str(tmp_path))
    monkeypatch.setenv("TOOLPLANE_RECEIPT_ALGORITHMS", "lint_python=hmac-sha256")
    KeyStore(tmp_path / "keys").ensure_all(["lint_python"], receipt_algorithm="ed25519")
    done = keys_cli("rotate", "lint_python", "--json")
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["algorithm"] == "hmac-sha256"
    done = keys_cli("rotate", "lint_python", "--algorithm", "ed25519", "--json")
    assert done.exit_code == 0 and json.loads(done.stdout)["algorithm"] == "ed25519"
    listed = json.loads(keys_cli("list", "--json").stdout)
    assert [k["algorithm"] for k in listed if k["owner"] == "tool.lint_python"] == [
        "ed25519",
        "hmac-sha256",
        "ed25519",
    ]
    for args, rule in (
        (["control", "--algorithm", "hmac-sha256"], "ed25519 only"),
        (["lint_python", "--algorithm", "rsa"], "must be one of ed25519, hmac-sha256"),
    ):
        bad = keys_cli("rotate", *args)
        assert bad.exit_code == EXIT_USAGE and "--algorithm" in bad.output and rule in bad.output


def test_hmac_secrets_are_read_by_tool_or_key_id_and_bad_ones_refused(tmp_path: Path) -> None:
    good = tmp_path / "good.key"
    good.write_text(base64.b64encode(b"s" * 32).decode() + "\n")
    short = tmp_path / "short.key"
    short.write_text(base64.b64encode(b"s").decode())
    assert read_hmac_secrets([f"lint_python={good}", f"tool.x:ab={good}"]) == {
        "lint_python": [b"s" * 32],
        "tool.x:ab": [b"s" * 32],
    }
    for option, rule in (
        ("lint_python", "expected TOOL=FILE or KEY_ID=FILE"),
        (f"x={tmp_path / 'missing'}", "No such file"),
        (f"x={short}", "at least 16 bytes"),
        (f"x={tmp_path}", "Is a directory"),
    ):
        with pytest.raises(UsageError) as e:
            read_hmac_secrets([option])
        assert e.value.field == "--hmac-secret" and rule in str(e.value), str(e.value)
