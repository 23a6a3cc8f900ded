"""A witness process cosigns the control's checkpoints and refuses a rewritten log.

The witness runs as `toolplane witness` (its own process, key and state, no database);
the checkpointer asks it before writing each checkpoint. A superuser who rewrites the
log, its tree tables and even the checkpoint directory gets no cosignature: the
witness remembers the tree it cosigned, refuses, and `ledger verify` names the refusal."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from control.ops.witness_client import WitnessClient
from ledger.checkpoints import checkpoint_chain, trusted_checkpoints
from ledger.cosignature import CosignatureVerifier
from ledger.note import split_note
from tests.harness import REPO, free_port, wait_for
from tests.integration.test_merkle_tree import (  # noqa: F401 - the database fixture
    CHAIN,
    append,
    checkpointing,
    database,
    superuser,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def witness(
    tmp_path: Path,
    checkpointing: dict[str, object],  # noqa: F811
) -> Iterator[dict[str, object]]:
    port = free_port()
    home = tmp_path / "witness"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOOLPLANE_")}
    env["PYTHONPATH"] = str(REPO)
    vkey = checkpointing["signer"].verifier.vkey  # type: ignore[attr-defined]
    process = subprocess.Popen(
        [sys.executable, "-m", "control.cli", "witness", "--home", str(home),
         "--bind", f"127.0.0.1:{port}", "--name", "witness.example", "--log-key", vkey],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

    def listening() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_for(listening, timeout=30, what="the witness listening")
        key = CosignatureVerifier.parse((home / "witness.vkey").read_text())
        yield {
            "client": WitnessClient([f"http://127.0.0.1:{port}"], [key]),
            "key": key,
            "home": home,
        }
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_witness_cosigns_then_refuses_a_rewritten_log(
    database: Engine,  # noqa: F811
    checkpointing: dict[str, object],  # noqa: F811
    witness: dict[str, object],
) -> None:
    cosign = witness["client"].cosign  # type: ignore[attr-defined]
    append(database, 5)
    with Session(database) as session:
        first = checkpoint_chain(session, CHAIN, cosign=cosign, **checkpointing)  # type: ignore[arg-type]
    text, sigs = split_note(first.note)
    assert [s.name for s in sigs] == ["test.example/toolplane", "witness.example"]
    witness["key"].verify(text, sigs[1])  # type: ignore[attr-defined]
    append(database, 4, start=5)
    with Session(database) as session:
        second = checkpoint_chain(session, CHAIN, cosign=cosign, **checkpointing)  # type: ignore[arg-type]
    assert len(split_note(second.note)[1]) == 2
    # The superuser rewrites event 2, drops the tree's tables and the checkpoint files, so
    # that the control's own check has nothing to compare with; the witness remembers.
    superuser(
        database,
        (
            'UPDATE evidence_events SET payload = \'{"n": 1, "decision": "deny"}\'::jsonb'
            " WHERE chain_id = :c AND seq = 2",
            {"c": CHAIN},
        ),
        ("DELETE FROM merkle_nodes WHERE chain_id = :c", {"c": CHAIN}),
        ("DELETE FROM merkle_trees WHERE chain_id = :c", {"c": CHAIN}),
    )
    store = checkpointing["store"]
    for size in store.sizes(CHAIN):  # type: ignore[attr-defined]
        (store.root / "tenant" / "tn_merkle" / f"{size:020d}.note").unlink()  # type: ignore[attr-defined]
    append(database, 1, start=9)
    with Session(database) as session:
        # The chain's hashes no longer link at seq 2, so rehash it as the superuser would.
        rows = session.execute(
            __import__("sqlalchemy").text(
                "SELECT id, seq, prev_hash, kind, tenant_id, run_id, created_at, payload"
                " FROM evidence_events WHERE chain_id = :c ORDER BY seq"
            ),
            {"c": CHAIN},
        ).all()
    from ledger.chain import event_hash

    statements, prev = [], rows[1].prev_hash
    for row in rows[1:]:
        new = event_hash(
            chain_id=CHAIN, seq=row.seq, prev_hash=prev, kind=row.kind,
            tenant_id=row.tenant_id, run_id=row.run_id, created_at=row.created_at,
            payload=row.payload,
        )  # fmt: skip
        statements.append(
            ("UPDATE evidence_events SET prev_hash = :p, hash = :h WHERE id = :id",
             {"p": prev, "h": new, "id": row.id})
        )  # fmt: skip
        prev = new
    statements.append(
        ("UPDATE chain_heads SET hash = :h WHERE chain_id = :c", {"h": prev, "c": CHAIN})
    )
    superuser(database, *statements)
    with Session(database) as session:
        forged = checkpoint_chain(session, CHAIN, cosign=cosign, **checkpointing)  # type: ignore[arg-type]
    assert [s.name for s in split_note(forged.note)[1]] == [
        "test.example/toolplane"
    ]  # no cosignature
    refusals = store.refusals(CHAIN)  # type: ignore[attr-defined]
    assert len(refusals) == 1 and refusals[0]["size"] == 10
    assert "not consistent with the checkpoint of size 9 cosigned before" in refusals[0]["problem"]
    _, problems = trusted_checkpoints(store, [CHAIN], [checkpointing["signer"].verifier])  # type: ignore[arg-type,attr-defined]
    assert len(problems) == 1 and "refused to cosign the checkpoint of size 10" in problems[0]
    witness_log = (Path(witness["home"]) / "refusals.log").read_text().splitlines()  # type: ignore[arg-type]
    assert json.loads(witness_log[0])["origin"].endswith("/tenant/tn_merkle")


def test_bundle_requires_the_pinned_witness(
    database: Engine,  # noqa: F811
    checkpointing: dict[str, object],  # noqa: F811
    witness: dict[str, object],
) -> None:
    """A bundle's checkpoint carries the witness's cosignature; verify-bundle with the
    witness pinned accepts it, and names a checkpoint without it."""
    from ledger.bundle import build_bundle
    from ledger.bundle_check import check_bundle
    from ledger.checkpoints import newest_checkpoint
    from ledger.cosignature import WitnessSigner
    from ledger.note import generate_signer
    from toolplane.signing import KeyRing

    append(database, 6)
    verifier = checkpointing["signer"].verifier  # type: ignore[attr-defined]
    with Session(database) as session:
        checkpoint_chain(session, CHAIN, cosign=witness["client"].cosign, **checkpointing)  # type: ignore[arg-type,attr-defined]
        cp, note = newest_checkpoint(checkpointing["store"], CHAIN, [verifier])  # type: ignore[arg-type,misc]
        data = build_bundle(
            session, chain_id=CHAIN, run_id="run_1", checkpoint=cp, note=note, keys=KeyRing()
        )
    report = check_bundle(data, [verifier], [], [witness["key"]])  # type: ignore[list-item]
    assert report.ok and report.witnesses == ["witness.example"], report.problems
    other = WitnessSigner.of(generate_signer("witness.example")).verifier
    report = check_bundle(data, [verifier], [], [other])
    assert report.problems == ["checkpoint: not cosigned by witness witness.example"]


def test_the_control_asks_its_witnesses(
    database: Engine,  # noqa: F811
    checkpointing: dict[str, object],  # noqa: F811
    witness: dict[str, object],
    tmp_path: Path,
) -> None:
    """TOOLPLANE_WITNESS_URLS and _KEYS: the control's checkpoints carry the cosignature,
    and a newest checkpoint without it is named."""
    from control.ops.runtime import ControlPlane
    from toolplane.settings import Settings

    client = witness["client"]
    settings = Settings(
        home=tmp_path,  # the keys of the `checkpointing` fixture: tmp_path / "keys"
        deployment="test.example/toolplane",
        witness_urls=client.urls[0],  # type: ignore[attr-defined]
        witness_keys=witness["key"].vkey,  # type: ignore[attr-defined]
    )
    plane = ControlPlane(
        settings,
        broker_url="redis://127.0.0.1:1/0",  # unused: checkpoints need no broker
        database_url=database.url.render_as_string(hide_password=False),
    )
    try:
        append(database, 3)
        signed, refused = plane.checkpoint([CHAIN])
        assert not refused and len(split_note(signed[0].note)[1]) == 2
        keys = plane.witnesses.keys  # type: ignore[union-attr]
        args = (plane.checkpoints, [CHAIN], plane.checkpoint_verifiers(), keys)
        assert trusted_checkpoints(*args)[1] == []
        append(database, 2, start=3)
        with Session(database) as session:  # a checkpoint signed without asking
            checkpoint_chain(session, CHAIN, **checkpointing)  # type: ignore[arg-type]
        assert trusted_checkpoints(*args)[1] == [
            f"{CHAIN}: checkpoint of size 5: not cosigned by witness witness.example"
        ]
    finally:
        plane.engine.dispose()
