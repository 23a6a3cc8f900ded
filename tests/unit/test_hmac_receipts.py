"""HMAC-SHA256 receipts, the configured alternative to Ed25519, end to end in memory."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from ledger.receipts import ReceiptProblem, check_result_message
from sandbox_tasks.receipts import build_result, sign_result
from toolplane.keystore import KeyStore
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
