"""The transparency log's costs (``make bench BENCH_ARGS="--only transparency"``).

On a database of its own: append throughput with and without the integrator running
beside the appends, integration throughput, inclusion and consistency proofs per
second (from the stored subtrees), checkpoint signing time (integrate + sign + write),
and building and checking the offline bundle of a synthetic 50-node run whose
envelopes and receipts are really signed.
"""

from __future__ import annotations

import json
import random
import secrets
import statistics
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session

from ledger.bundle import build_bundle
from ledger.bundle_check import check_bundle
from ledger.chain import NewEvent, chain_for
from ledger.checkpoints import DirectoryCheckpointStore, checkpoint_chain, load_signer
from ledger.migrate import upgrade
from ledger.store import append_events
from ledger.tree import integrate, prove_consistency, prove_inclusion
from tests.harness import _libpq, start_services
from toolplane.canonical import digest
from toolplane.messages import (
    Envelope,
    Receipt,
    ResultMessage,
    SignedEnvelope,
    ToolResult,
    signed_bytes,
)
from toolplane.signing import Ed25519Signer, KeyRing, PublicKey

__all__ = ["run"]


def _database(admin: str) -> tuple[Engine, str]:
    name = f"tp_bench_{secrets.token_hex(5)}"
    with psycopg.connect(_libpq(admin), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    engine = create_engine(make_url(admin).set(database=name, drivername="postgresql+psycopg"))
    upgrade(engine)
    return engine, name


def _append(engine: Engine, tenant: str, total: int, batch: int) -> float:
    """Events per second, ``batch`` events per transaction (as ingest appends)."""
    start = time.perf_counter()
    for i in range(0, total, batch):
        with Session(engine) as session:
            append_events(
                session,
                [
                    NewEvent("PolicyDecision", {"n": i + j, "decision": "allow"}, tenant, "run_b")
                    for j in range(batch)
                ],
            )
            session.commit()
    return total / (time.perf_counter() - start)


def _appends(engine: Engine, total: int) -> dict[str, float]:
    plain = _append(engine, "tn_plain", total, 4)
    stop = threading.Event()
    chain = chain_for("tn_tree")

    def integrator() -> None:
        while not stop.wait(0.05):
            with Session(engine) as session:
                integrate(session, chain)
                session.commit()

    thread = threading.Thread(target=integrator)
    thread.start()
    try:
        with_tree = _append(engine, "tn_tree", total, 4)
    finally:
        stop.set()
        thread.join()
    return {"append_events_per_s": round(plain), "append_events_per_s_with_tree": round(with_tree)}


def _proofs(engine: Engine, size: int, samples: int) -> dict[str, float]:
    chain = chain_for("tn_proofs")
    _append(engine, "tn_proofs", size, 500)
    with Session(engine) as session:
        start = time.perf_counter()
        integrate(session, chain)
        session.commit()
        integrated = size / (time.perf_counter() - start)
        rng = random.Random(17)  # noqa: S311 - sample positions, not secrets
        start = time.perf_counter()
        for _ in range(samples):
            prove_inclusion(session, chain, rng.randrange(size), size)
        inclusion = samples / (time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(samples):
            prove_consistency(session, chain, rng.randrange(1, size), size)
        consistency = samples / (time.perf_counter() - start)
    return {
        "tree_size": size,
        "integrate_events_per_s": round(integrated),
        "inclusion_proofs_per_s": round(inclusion),
        "consistency_proofs_per_s": round(consistency),
    }


def _checkpoints(engine: Engine, home: Path, rounds: int) -> dict[str, float]:
    signer = load_signer(home / "keys", "bench.example")
    store = DirectoryCheckpointStore(home / "checkpoints")
    chain = chain_for("tn_proofs")
    times = []
    for i in range(rounds):
        with Session(engine) as session:
            append_events(session, [NewEvent("RunCompleted", {"n": i}, "tn_proofs", "run_b")])
            session.commit()
            start = time.perf_counter()
            checkpoint_chain(session, chain, signer=signer, store=store, deployment="bench.example")
            times.append(time.perf_counter() - start)
    return {"checkpoint_ms_median": round(statistics.median(times) * 1000, 2)}


def _signed_run(engine: Engine, nodes: int) -> tuple[KeyRing, list[dict[str, Any]]]:
    """A run of ``nodes`` calls with real envelope signatures and receipts."""
    now = datetime.now(UTC)
    keys, ring = {}, KeyRing()
    for owner in ("control", "tool.bench"):
        private = Ed25519PrivateKey.generate()
        material = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        key_id = f"{owner}:{secrets.token_hex(8)}"
        keys[owner] = Ed25519Signer(private, key_id, owner)
        ring.add(PublicKey(key_id, owner, "ed25519", material, now - timedelta(hours=1)))
    events = []
    for n in range(nodes):
        node, args = f"n{n}", {"path": f"f{n}.py"}
        decision = {"node_id": node, "attempt": 1, "decision_id": f"dec{n}", "decision": "allow",
                    "bundle_version": "v1", "policies": ["p"], "request": {}}  # fmt: skip
        envelope = Envelope(
            job_id=f"run_b50/{node}/1", run_id="run_b50", node_id=node, attempt=1,
            tenant="tn_b50", principal="bench", tool="bench", audience="tool.bench",
            args=args, args_sha256=digest(args), policy_decision_id=f"dec{n}",
            policy_version="v1", issued_at=0, expires_at=1, nonce=secrets.token_hex(16),
            key_id=keys["control"].key_id,
        )  # fmt: skip
        signed = SignedEnvelope(
            envelope=envelope, signature=keys["control"].sign(signed_bytes(envelope))
        )
        content = {"content": "x" * 200, "n": n}
        result = ToolResult(
            kind="result", ok=True, tool="bench", worker="w", job_id=envelope.job_id,
            run_id="run_b50", node_id=node, attempt=1, envelope_sha256=signed.digest,
            started_at=0, finished_at=1, duration_ms=1, result=content,
            result_sha256=digest(content),
        )  # fmt: skip
        receipt = Receipt(key_id=keys["tool.bench"].key_id, algorithm="ed25519",
                          signature=keys["tool.bench"].sign(signed_bytes(result)))  # fmt: skip
        message = ResultMessage(result=result, receipt=receipt).model_dump(mode="json")
        common = {"node_id": node, "attempt": 1, "envelope_sha256": signed.digest}
        events += [
            NewEvent("PolicyDecision", decision, "tn_b50", "run_b50"),
            NewEvent(
                "ToolCallDispatched",
                dict(common, envelope=signed.model_dump(mode="json")),
                "tn_b50",
                "run_b50",
            ),
            NewEvent("ToolCallCompleted", dict(common, message=message), "tn_b50", "run_b50"),
        ]
    with Session(engine) as session:
        append_events(session, events)
        session.commit()
    return ring, events  # type: ignore[return-value]


def _bundle(engine: Engine, home: Path, rounds: int) -> dict[str, float]:
    ring, _ = _signed_run(engine, 50)
    signer = load_signer(home / "keys", "bench.example")
    store = DirectoryCheckpointStore(home / "checkpoints")
    chain = chain_for("tn_b50")
    with Session(engine) as session:
        signed = checkpoint_chain(
            session, chain, signer=signer, store=store, deployment="bench.example"
        )
        start = time.perf_counter()
        data = build_bundle(session, chain_id=chain, run_id="run_b50", checkpoint=signed.checkpoint,
                            note=signed.note, keys=ring)  # fmt: skip
        built = time.perf_counter() - start
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        report = check_bundle(data, [signer.verifier])
        times.append(time.perf_counter() - start)
        assert report.ok and report.receipts == 50, report.problems
    return {
        "bundle_nodes": 50,
        "bundle_bytes": len(data),
        "bundle_build_ms": round(built * 1000, 1),
        "verify_bundle_ms_median": round(statistics.median(times) * 1000, 1),
    }


def run(*, events: int = 20_000, appends: int = 4_000, samples: int = 2_000) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tp-bench-tlog-") as tmp:
        services = start_services(Path(tmp))
        engine, name = _database(services.admin_url)
        try:
            result: dict[str, Any] = {"at": datetime.now(UTC).isoformat(timespec="seconds")}
            result |= _appends(engine, appends)
            result |= _proofs(engine, events, samples)
            result |= _checkpoints(engine, Path(tmp), 30)
            result |= _bundle(engine, Path(tmp), 20)
            return result
        finally:
            engine.dispose()
            with psycopg.connect(_libpq(services.admin_url), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            services.close()


def write(result: dict[str, Any], results: Path, stem: str) -> Path:
    path = results / f"{stem}-transparency.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
