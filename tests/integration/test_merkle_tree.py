"""Each chain's Merkle tree in PostgreSQL, its checkpoints, and tampering by a superuser.

A database of its own: the integrator, proofs, checkpoints and ``verify_ledger`` against
them, then a superuser who rewinds or rewrites the log (around the triggers)."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session

from ledger.chain import NewEvent, chain_for, event_hash
from ledger.checkpoints import (
    CheckpointRefused,
    DirectoryCheckpointStore,
    checkpoint_chain,
    load_signer,
    trusted_checkpoints,
)
from ledger.leaf import event_leaf
from ledger.merkle import leaf_hash, root_from_leaves, verify_consistency, verify_inclusion
from ledger.migrate import upgrade
from ledger.models import EvidenceEvent
from ledger.note import open_note
from ledger.store import append_events
from ledger.tree import integrate, prove_consistency, prove_inclusion, state
from ledger.verify import verify_ledger
from tests.harness import Services, _libpq
from toolplane.signing import KeyRing

pytestmark = pytest.mark.integration
TENANT = "tn_merkle"
CHAIN = chain_for(TENANT)


@pytest.fixture
def database(services: Services) -> Iterator[Engine]:
    name = f"tp_merkle_{secrets.token_hex(5)}"
    with psycopg.connect(_libpq(services.admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(services.admin_url).set(database=name, drivername="postgresql+psycopg")
    engine = create_engine(url)
    upgrade(engine)
    try:
        yield engine
    finally:
        engine.dispose()
        with psycopg.connect(_libpq(services.admin_url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def append(engine: Engine, count: int, *, start: int = 0) -> None:
    with Session(engine) as session:
        append_events(
            session,
            [
                NewEvent("PolicyDecision", {"n": start + i, "decision": "allow"}, TENANT, "run_1")
                for i in range(count)
            ],
        )
        session.commit()


def leaf_hashes(engine: Engine) -> list[bytes]:
    with Session(engine) as session:
        rows = session.scalars(
            select(EvidenceEvent).where(EvidenceEvent.chain_id == CHAIN).order_by(EvidenceEvent.seq)
        ).all()
        return [
            leaf_hash(
                event_leaf(
                    chain_id=r.chain_id,
                    seq=r.seq,
                    prev_hash=r.prev_hash,
                    kind=r.kind,
                    tenant_id=r.tenant_id,
                    run_id=r.run_id,
                    created_at=r.created_at,
                    payload=r.payload,
                )
            )
            for r in rows
        ]


def superuser(engine: Engine, *statements: tuple[str, dict[str, object]]) -> None:
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL session_replication_role = replica"))
        for statement, params in statements:
            conn.execute(text(statement), params)


def test_integrator_catches_up_and_serves_proofs(database: Engine) -> None:
    sizes = []
    for batch in (1, 2, 5, 13, 1, 21):
        append(database, batch, start=sum(sizes))
        sizes.append(batch)
        with Session(database) as session:
            tree = integrate(session, CHAIN)
            session.commit()
        hashes = leaf_hashes(database)
        assert tree.size == len(hashes) == sum(sizes)
        assert tree.root == root_from_leaves(hashes)
    with Session(database) as session:
        for index in range(len(hashes)):
            proof, root = prove_inclusion(session, CHAIN, index, len(hashes))
            verify_inclusion(hashes[index], index, len(hashes), proof, root)
        for old in range(1, len(hashes) + 1, 3):
            proof, old_root, new_root = prove_consistency(session, CHAIN, old, len(hashes))
            assert old_root == root_from_leaves(hashes[:old])
            verify_consistency(old, len(hashes), proof, old_root, new_root)
        # Integrating again reads nothing new and changes nothing.
        assert integrate(session, CHAIN).size == len(hashes)
        count = session.execute(
            text("SELECT count(*) FROM merkle_nodes WHERE chain_id = :c"), {"c": CHAIN}
        ).scalar_one()
        assert count == 2 * len(hashes) - bin(len(hashes)).count("1")


def test_integrator_refuses_a_chain_rewritten_past_it(database: Engine) -> None:
    append(database, 6)
    with Session(database) as session:
        integrate(session, CHAIN)
        session.commit()
    append(database, 3, start=6)
    superuser(
        database,
        (
            "UPDATE evidence_events SET payload = '{\"n\": 99}'::jsonb"
            " WHERE chain_id = :c AND seq = 8",
            {"c": CHAIN},
        ),
    )
    with Session(database) as session, pytest.raises(Exception, match="seq 8: hash does not"):
        integrate(session, CHAIN)
    with Session(database) as session:
        assert state(session, CHAIN).size == 6


@pytest.fixture
def checkpointing(database: Engine, tmp_path: Path) -> dict[str, object]:
    signer = load_signer(tmp_path / "keys", "test.example/toolplane")
    store = DirectoryCheckpointStore(tmp_path / "checkpoints")
    return {"signer": signer, "store": store, "deployment": "test.example/toolplane"}


def verify(engine: Engine, cp: dict[str, object]) -> list[str]:
    found, problems = trusted_checkpoints(cp["store"], [CHAIN], [cp["signer"].verifier])  # type: ignore[arg-type,attr-defined]
    assert not problems
    with Session(engine) as session:
        report = verify_ledger(session, KeyRing(), tenant_id=TENANT, checkpoints=found)
    return [b.problem for b in report.broken]


def test_checkpoints_are_signed_notes_in_append_only_files(
    database: Engine, checkpointing: dict[str, object]
) -> None:
    append(database, 5)
    with Session(database) as session:
        first = checkpoint_chain(session, CHAIN, **checkpointing)  # type: ignore[arg-type]
        again = checkpoint_chain(session, CHAIN, **checkpointing)  # type: ignore[arg-type]
    assert first.written and not again.written
    store: DirectoryCheckpointStore = checkpointing["store"]  # type: ignore[assignment]
    note = store.read(CHAIN, 5)
    text_, sigs = open_note(note, [checkpointing["signer"].verifier])  # type: ignore[attr-defined]
    origin, size, root = text_.splitlines()
    assert origin == "test.example/toolplane/tenant/tn_merkle" and size == "5"
    assert sigs[0].name == "test.example/toolplane"
    append(database, 4, start=5)
    with Session(database) as session:
        checkpoint_chain(session, CHAIN, **checkpointing)  # type: ignore[arg-type]
    assert store.sizes(CHAIN) == [5, 9]
    assert store.read(CHAIN, 5) == note  # never rewritten
    assert verify(database, checkpointing) == []


def test_rewound_log_is_named_and_refused(
    database: Engine, checkpointing: dict[str, object]
) -> None:
    append(database, 8)
    with Session(database) as session:
        checkpoint_chain(session, CHAIN, **checkpointing)  # type: ignore[arg-type]
    with Session(database) as session:
        seq6 = session.execute(
            select(EvidenceEvent.hash).where(
                EvidenceEvent.chain_id == CHAIN, EvidenceEvent.seq == 6
            )
        ).scalar_one()
    superuser(  # delete the last two events and rewind the head (and the tree's tables)
        database,
        ("DELETE FROM evidence_events WHERE chain_id = :c AND seq > 6", {"c": CHAIN}),
        ("UPDATE chain_heads SET seq = 6, hash = :h WHERE chain_id = :c", {"c": CHAIN, "h": seq6}),
        ("DELETE FROM merkle_nodes WHERE chain_id = :c", {"c": CHAIN}),
        ("DELETE FROM merkle_trees WHERE chain_id = :c", {"c": CHAIN}),
    )
    problems = verify(database, checkpointing)
    assert problems == [
        "log shorter than its checkpoint: checkpoint size 8, table ends at seq 6"
    ], problems
    with (
        Session(database) as session,
        pytest.raises(CheckpointRefused, match="6 leaves, its checkpoint 8"),
    ):
        checkpoint_chain(session, CHAIN, **checkpointing)  # type: ignore[arg-type]


def test_rewritten_decision_with_rehashed_chain_is_named_and_refused(
    database: Engine, checkpointing: dict[str, object]
) -> None:
    append(database, 7)
    with Session(database) as session:
        checkpoint_chain(session, CHAIN, **checkpointing)  # type: ignore[arg-type]
    append(database, 2, start=7)
    # A superuser turns decision 3 into a denial and recomputes every hash after it,
    # the head and the tree's tables: the chain itself verifies again.
    with Session(database) as session:
        rows = session.scalars(
            select(EvidenceEvent).where(EvidenceEvent.chain_id == CHAIN).order_by(EvidenceEvent.seq)
        ).all()
        session.expunge_all()
    statements: list[tuple[str, dict[str, object]]] = []
    prev = rows[2].prev_hash
    for row in rows[2:]:
        payload = dict(row.payload)
        if row.seq == 3:
            payload["decision"] = "deny"
        new = event_hash(
            chain_id=row.chain_id,
            seq=row.seq,
            prev_hash=prev,
            kind=row.kind,
            tenant_id=row.tenant_id,
            run_id=row.run_id,
            created_at=row.created_at,
            payload=payload,
        )
        statements.append(
            (
                "UPDATE evidence_events SET payload = CAST(:p AS jsonb), prev_hash = :prev,"
                " hash = :h WHERE id = :id",
                {"p": __import__("json").dumps(payload), "prev": prev, "h": new, "id": row.id},
            )
        )
        prev = new
    statements += [
        ("UPDATE chain_heads SET hash = :h WHERE chain_id = :c", {"c": CHAIN, "h": prev}),
        ("DELETE FROM merkle_nodes WHERE chain_id = :c", {"c": CHAIN}),
        ("DELETE FROM merkle_trees WHERE chain_id = :c", {"c": CHAIN}),
    ]
    superuser(database, *statements)
    with Session(database) as session:  # without the checkpoint, nothing shows
        assert verify_ledger(session, KeyRing(), tenant_id=TENANT).ok
    problems = verify(database, checkpointing)
    assert len(problems) == 1 and "does not match the signed checkpoint of size 7" in problems[0]
    with Session(database) as session, pytest.raises(CheckpointRefused, match="not consistent"):
        checkpoint_chain(session, CHAIN, **checkpointing)  # type: ignore[arg-type]
    store: DirectoryCheckpointStore = checkpointing["store"]  # type: ignore[assignment]
    assert store.sizes(CHAIN) == [7]
    assert hashlib.sha256(store.read(CHAIN, 7)).hexdigest()  # the old checkpoint is intact


def test_swapped_tenants_events_are_named(
    database: Engine, checkpointing: dict[str, object]
) -> None:
    """A superuser swaps the bodies of two tenants' events and rehashes both chains:
    each chain verifies alone, neither matches its checkpoint."""
    other = "tn_other"
    append(database, 4)
    with Session(database) as session:
        append_events(
            session,
            [NewEvent("PolicyDecision", {"n": i, "decision": "deny"}, other) for i in range(4)],
        )
        session.commit()
    chains = [CHAIN, chain_for(other)]
    with Session(database) as session:
        for chain in chains:
            checkpoint_chain(session, chain, **checkpointing)  # type: ignore[arg-type]
        rows = {
            chain: session.scalars(
                select(EvidenceEvent)
                .where(EvidenceEvent.chain_id == chain)
                .order_by(EvidenceEvent.seq)
            ).all()
            for chain in chains
        }
        session.expunge_all()
    swapped = {CHAIN: rows[chains[1]][2].payload, chains[1]: rows[CHAIN][2].payload}
    statements: list[tuple[str, dict[str, object]]] = []
    for chain in chains:
        prev = rows[chain][2].prev_hash
        for row in rows[chain][2:]:
            payload = swapped[chain] if row.seq == 3 else row.payload
            new = event_hash(
                chain_id=chain, seq=row.seq, prev_hash=prev, kind=row.kind,
                tenant_id=row.tenant_id, run_id=row.run_id, created_at=row.created_at,
                payload=payload,
            )  # fmt: skip
            statements.append(
                ("UPDATE evidence_events SET payload = CAST(:p AS jsonb), prev_hash = :prev,"
                 " hash = :h WHERE id = :id",
                 {"p": __import__("json").dumps(payload), "prev": prev, "h": new, "id": row.id})
            )  # fmt: skip
            prev = new
        statements.append(
            ("UPDATE chain_heads SET hash = :h WHERE chain_id = :c", {"h": prev, "c": chain})
        )
    superuser(database, *statements)
    store = checkpointing["store"]
    found, _ = trusted_checkpoints(store, chains, [checkpointing["signer"].verifier])  # type: ignore[arg-type,attr-defined]
    with Session(database) as session:
        assert verify_ledger(session, KeyRing()).ok  # the chains alone
        report = verify_ledger(session, KeyRing(), checkpoints=found)
    named = sorted(
        (b.chain_id, "does not match the signed checkpoint" in b.problem) for b in report.broken
    )
    assert named == sorted((c, True) for c in chains), report.broken
