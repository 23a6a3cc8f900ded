"""HMAC-SHA256 receipts for one tool beside Ed25519 for another, and rotation of both kinds
of receipt key, against the real stack (a control process and real workers).

`sleepy` signs its receipts with an HMAC secret (TOOLPLANE_RECEIPT_ALGORITHMS), and
`read_repo_file` with Ed25519 (the default). Calls before and after `toolplane keys
rotate` of both complete with no worker restart; `ledger verify` passes across the
rotation; bundles of the runs from before it verify offline after it; the HMAC receipt is
reported as not verifiable by a third party unless its secret is given, and a wrong
secret fails naming the receipt. A retired HMAC key signs nothing new: a result signed
with it after its grace is refused by ingest.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

import celeryconfig
from tests.harness import Services, Stack, own_services, start_stack, stop_stack, wait_for
from tests.integration.test_transparency import offline
from tests.security.test_key_revocation import (
    cli_json,
    keys,
    push,
    queued_node,
    result_for,
    retire_long_ago,
    unverified,
)

pytestmark = pytest.mark.integration

ARGS = {"sleepy": {"seconds": 0}, "read_repo_file": {"path": "README.md"}}
KINDS = {"sleepy": "hmac-sha256", "read_repo_file": "ed25519"}


@pytest.fixture(scope="module")
def kinds(
    services: Services, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, Celery]]:
    """A stack of its own whose `sleepy` signs receipts with HMAC-SHA256."""
    own = own_services(services)
    running = start_stack(
        own,
        Path(tmp_path_factory.mktemp("receipt-kinds")),
        workers={"sleepy": 1, "read_repo_file": 1},
        extra_env={"TOOLPLANE_RECEIPT_ALGORITHMS": "sleepy=hmac-sha256"},
    )
    app = Celery("attacker", set_as_current=False)
    app.conf.update(celeryconfig.build_config(own.redis_url))
    try:
        yield running, app
    finally:
        stop_stack(running)
        own.close()


def call(client: Any, tool: str) -> Any:
    view = client.call(tool, ARGS[tool], wait=True)
    assert view.status == "completed", view.as_dict()
    return view


def verify(stack: Stack, token: str) -> dict[str, Any]:
    done = stack.cli("ledger", "verify", "--json", token=token)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"], report
    return report


def verify_bundle(bundle: Path, trust: Path, *secrets: str) -> tuple[int, dict[str, Any]]:
    args = [a for s in secrets for a in ("--hmac-secret", s)]
    done = offline("ledger", "verify-bundle", str(bundle), "--trust", str(trust), *args, "--json")
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def test_hmac_and_ed25519_receipts_across_a_rotation_of_both(
    kinds: tuple[Stack, Celery], tmp_path: Path
) -> None:
    stack, _ = kinds
    token = stack.tenant()
    client = stack.client(token)
    active = {e["owner"]: e for e in cli_json(stack, "keys", "list") if e["not_after"] is None}
    assert {t: active[f"tool.{t}"]["algorithm"] for t in KINDS} == KINDS  # chosen per tool
    store = keys(stack)
    old = {tool: store.signer(f"tool.{tool}").key_id for tool in KINDS}

    before = {tool: call(client, tool) for tool in KINDS}
    for tool, view in before.items():
        receipt = view.nodes[0].receipt
        assert (receipt["algorithm"], receipt["key_id"]) == (KINDS[tool], old[tool])
    assert verify(stack, token)["receipts_verified"] == 2  # the control holds the secret

    rotated = {tool: cli_json(stack, "keys", "rotate", tool) for tool in KINDS}
    for tool, done in rotated.items():  # each keeps its kind; the workers are not restarted
        assert done["algorithm"] == KINDS[tool] and done["key_id"] != old[tool]
        assert store.signer(f"tool.{tool}").key_id == done["key_id"]
    after = {tool: call(client, tool) for tool in KINDS}
    for tool, view in after.items():
        receipt = view.nodes[0].receipt
        assert (receipt["algorithm"], receipt["key_id"]) == (KINDS[tool], rotated[tool]["key_id"])
    assert verify(stack, token)["receipts_verified"] == 4  # those from before still verify

    # Bundles of the runs from before the rotation, exported and checked after it.
    trust = tmp_path / "trust.json"
    assert stack.cli("ledger", "trust", "--out", str(trust)).returncode == 0
    bundles = {}
    for tool, view in before.items():
        bundles[tool] = tmp_path / f"{tool}.bundle.json"
        done = stack.cli("ledger", "export", view.run_id, "--out", str(bundles[tool]), token=token)
        assert done.returncode == 0, done.stderr

    status, report = verify_bundle(bundles["read_repo_file"], trust)
    assert status == 0 and report["ok"], report
    assert report["receipts_verified"] == 1 and report["receipts_not_verifiable"] == []

    # Without the secret: ok (all else verifies), the HMAC receipt named as unverifiable.
    status, report = verify_bundle(bundles["sleepy"], trust)
    assert status == 0 and report["ok"] and report["receipts_verified"] == 0, report
    (where,) = report["receipts_not_verifiable"]
    (note,) = [n for n in report["notes"] if n.startswith(f"{where}.receipt:")]
    assert "not verifiable by a third party without the secret" in note and old["sleepy"] in note

    # With the secret of the key that signed it (retired since), by tool or by key id.
    secret = store._private_path(old["sleepy"])
    for name in ("sleepy", old["sleepy"]):
        status, report = verify_bundle(bundles["sleepy"], trust, f"{name}={secret}")
        assert status == 0 and report["ok"], report
        assert report["receipts_verified"] == 1 and report["receipts_not_verifiable"] == []

    # A wrong secret (the key that replaced it) fails, naming the receipt.
    wrong = store._private_path(rotated["sleepy"]["key_id"])
    status, report = verify_bundle(bundles["sleepy"], trust, f"sleepy={wrong}")
    assert status == 1 and not report["ok"]
    (problem,) = report["problems"]
    assert problem.startswith(f"{where}.receipt: HMAC-SHA256 receipt of tool sleepy"), problem
    assert "signature does not verify" in problem
    human = offline("ledger", "verify-bundle", str(bundles["sleepy"]), "--trust", str(trust))
    assert human.returncode == 0 and "1 HMAC receipts not verifiable" in human.stdout
    bad = offline("ledger", "verify-bundle", str(bundles["sleepy"]), "--trust", str(trust),
                  "--hmac-secret", "sleepy")  # fmt: skip
    assert bad.returncode == 2 and "--hmac-secret" in bad.stderr


def test_a_retired_hmac_key_signs_nothing_new(kinds: tuple[Stack, Celery]) -> None:
    stack, broker = kinds
    client = stack.client(stack.tenant())
    cli_json(stack, "keys", "rotate", "sleepy")
    retired = keys(stack).signer("tool.sleepy")  # a key that signs nothing but our forgery
    assert retired.algorithm == "hmac-sha256"
    replacement = cli_json(stack, "keys", "rotate", "sleepy")["key_id"]
    assert keys(stack).signer("tool.sleepy").key_id == replacement  # never the retired one
    retire_long_ago(stack, [retired.key_id])

    view = client.call("sleepy", {"seconds": 3})
    forged = result_for(queued_node(client, view.run_id), retired)
    push(broker, celeryconfig.INGEST_TASK, celeryconfig.RESULTS_QUEUE, forged)
    (invalid,) = wait_for(lambda: unverified(client, forged), timeout=30, what="invalid")
    assert "grace ended" in invalid["problem"] and retired.key_id in invalid["problem"]
    final = client.wait(view.run_id, timeout=60)  # the real worker's own result
    assert final.nodes[0].status == "completed"
    receipt = final.nodes[0].receipt
    assert (receipt["algorithm"], receipt["key_id"]) == ("hmac-sha256", replacement)
    assert client.verify_ledger().ok
