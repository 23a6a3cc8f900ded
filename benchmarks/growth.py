"""Costs that must not grow with the ledger: submit p50, ingest throughput, the first page
of ``runs list``, and ``ledger verify``'s rate, on an empty ledger and with a million
evidence events already in it.

The history is made by cloning real runs: a few calls go through the whole governed path
(API, policy, worker, receipt, ingest); then each of their rows (``runs``, ``nodes``,
``attempts``, ``outbox``, ``run_events`` and every evidence event) is copied again and
again under new run ids, and the copies' events are appended to the tenant's chain with
their own sequence numbers, previous hashes and hashes, so that the grown chain verifies
like one the real path wrote. A copy keeps each signed message as it was (its receipt
verifies; only the rows around it name the copy's run). Rows go in with COPY; the
triggers that tell followers about a run's changes are off while they do, and their
``run_events`` rows are copied instead. Evidence events stay append-only: nothing is
updated or deleted.

Ingest throughput is measured alone: the control process is stopped (SIGSTOP) while the
workers answer a batch of calls, then continued, and timed until every run has ended.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import psycopg
import redis
from rich.progress import Progress

from ledger.chain import chain_for, event_hash
from sandbox_tasks.receipts import sign_result
from tests.harness import start_services, start_stack, stop_stack, wait_for
from toolplane.canonical import sha256_hex
from toolplane.keystore import KeyStore
from toolplane.messages import Envelope, SignedEnvelope, ToolResult, signed_bytes
from toolplane.signing import Signer

__all__ = ["grow", "run"]

FILE = "src/shipit/deploy.py"
TABLES = ("runs", "nodes", "attempts", "outbox", "run_events")
SKIP = {"outbox": ("id",), "run_events": ("id",)}  # identity columns: new values
PREFETCH = 4  # results the stopped control may have taken (its one pending fetch, and a margin)


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def _p50(values: list[float]) -> float:
    return statistics.median(values) * 1000


class Cloner:
    """One copy of a template run under a new run id: every string that names the old run
    or one of its envelopes' digests names the copy's instead, and what was signed is
    signed again with the deployment's own keys (the control's for an envelope, the
    tool's for a receipt), as the real path would have signed the copy."""

    def __init__(self, control: Signer, tools: dict[str, Signer]) -> None:
        self.control, self.tools = control, tools

    def begin(self, old: str, envelopes: list[dict[str, Any]]) -> None:
        self.old, self.new = old, f"run_{secrets.token_hex(12)}"
        self.digests: dict[str, str] = {}
        for signed in envelopes:  # the digest each copied envelope will have
            before = SignedEnvelope.model_validate(signed).digest
            after = Envelope.model_validate(self._strings(signed["envelope"]))
            self.digests[before] = sha256_hex(signed_bytes(after))

    def _text(self, value: str) -> str:
        value = value.replace(self.old, self.new)
        return self.digests.get(value, value)

    def _strings(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._text(value)
        if isinstance(value, list):
            return [self._strings(v) for v in value]
        if isinstance(value, dict):
            return {k: self._strings(v) for k, v in value.items()}
        return value

    def value(self, value: Any) -> Any:
        """``value`` for the copy, its signed parts signed again."""
        if isinstance(value, list):
            return [self.value(v) for v in value]
        if not isinstance(value, dict):
            return self._strings(value)
        if set(value) == {"envelope", "signature"}:
            envelope = Envelope.model_validate(self._strings(value["envelope"]))
            return SignedEnvelope(
                envelope=envelope, signature=self.control.sign(signed_bytes(envelope))
            ).model_dump(mode="json")
        if set(value) == {"result", "receipt"}:
            result = ToolResult.model_validate(self._strings(value["result"]))
            return sign_result(result, self.tools[result.tool]).model_dump(mode="json")
        return {k: self.value(v) for k, v in value.items()}

    def row(self, columns: list[str], row: tuple[Any, ...]) -> list[Any]:
        out = []
        for name, value in zip(columns, row, strict=True):
            if name == "idempotency_key" and value is not None:
                value = f"{value}-{self.new}"
            elif isinstance(value, dict | list):
                value = json.dumps(self.value(value))
            elif isinstance(value, str):
                value = self._text(value)
            out.append(value)
        return out


class Template:
    """The rows of some real runs of one tenant, to copy."""

    def __init__(self, conn: psycopg.Connection, tenant_id: str, run_ids: list[str]) -> None:
        self.run_ids = run_ids
        self.columns: dict[str, list[str]] = {}
        self.rows: dict[str, dict[str, list[tuple[Any, ...]]]] = {}
        for table in TABLES:
            key = "id" if table == "runs" else "run_id"
            cur = conn.execute(
                f"SELECT * FROM {table} WHERE {key} = ANY(%s) ORDER BY {key}",  # noqa: S608
                (run_ids,),
            )
            names = [d.name for d in cur.description or []]
            keep = [i for i, n in enumerate(names) if n not in SKIP.get(table, ())]
            self.columns[table] = [names[i] for i in keep]
            by_run: dict[str, list[tuple[Any, ...]]] = {r: [] for r in run_ids}
            at = names.index(key)
            for row in cur.fetchall():
                by_run[row[at]].append(tuple(row[i] for i in keep))
            self.rows[table] = by_run
        self.events = {
            r: conn.execute(
                "SELECT tenant_id, run_id, kind, payload, created_at FROM evidence_events"
                " WHERE chain_id = %s AND run_id = %s ORDER BY seq",
                (chain_for(tenant_id), r),
            ).fetchall()
            for r in run_ids
        }
        self.events_per_copy = statistics.mean(len(e) for e in self.events.values())
        at = self.columns["nodes"].index("envelope")
        self.envelopes = {
            r: [row[at] for row in self.rows["nodes"][r] if row[at] is not None] for r in run_ids
        }


def grow(database_url: str, tenant_id: str, template: Template, cloner: Cloner, events: int) -> int:
    """Append copies of the template runs until the tenant's chain has grown by about
    ``events``; returns how many were appended. One transaction per chunk, with the
    chain's head locked as the real append path locks it."""
    chain = chain_for(tenant_id)
    appended = 0
    with psycopg.connect(_libpq(database_url)) as conn:
        while appended < events:
            with conn.transaction():
                conn.execute("SET LOCAL session_replication_role = replica")  # no notify
                seq, prev = conn.execute(
                    "SELECT seq, hash FROM chain_heads WHERE chain_id = %s FOR UPDATE", (chain,)
                ).fetchone()  # type: ignore[misc]
                chunk: list[tuple[Any, ...]] = []
                tables: dict[str, list[list[Any]]] = {t: [] for t in TABLES}
                while len(chunk) < 20_000 and appended + len(chunk) < events:
                    for old in template.run_ids:
                        cloner.begin(old, template.envelopes[old])
                        for table in TABLES:
                            for row in template.rows[table][old]:
                                tables[table].append(cloner.row(template.columns[table], row))
                        for tenant, _run, kind, payload, created_at in template.events[old]:
                            seq += 1
                            payload = cloner.value(payload)
                            link = event_hash(
                                chain_id=chain,
                                seq=seq,
                                prev_hash=prev,
                                kind=kind,
                                tenant_id=tenant,
                                run_id=cloner.new,
                                created_at=created_at,
                                payload=payload,
                            )
                            chunk.append(
                                (chain, seq, tenant, cloner.new, kind, json.dumps(payload))
                                + (created_at, prev, link)
                            )
                            prev = link
                for table in TABLES:
                    cols = ", ".join(template.columns[table])
                    with conn.cursor().copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
                        for row in tables[table]:
                            copy.write_row(row)
                with conn.cursor().copy(
                    "COPY evidence_events (chain_id, seq, tenant_id, run_id, kind, payload,"
                    " created_at, prev_hash, hash) FROM STDIN"
                ) as copy:
                    for event in chunk:
                        copy.write_row(event)
                conn.execute(
                    "UPDATE chain_heads SET seq = %s, hash = %s WHERE chain_id = %s",
                    (seq, prev, chain),
                )
                appended += len(chunk)
        conn.execute("ANALYZE")
    return appended


def integrated(database_url: str, tenant_id: str, *, timeout: float) -> float:
    """Wait until the control's Merkle-tree integrator has taken in the whole chain (the
    real path integrates as it appends; a bulk load leaves it to catch up, which would
    otherwise run during the measurements); returns the seconds it took."""
    chain = chain_for(tenant_id)
    start = time.perf_counter()

    def caught_up() -> bool:
        with psycopg.connect(_libpq(database_url)) as conn:
            row = conn.execute(
                "SELECT h.seq, coalesce(t.size, 0) FROM chain_heads h"
                " LEFT JOIN merkle_trees t ON t.chain_id = h.chain_id WHERE h.chain_id = %s",
                (chain,),
            ).fetchone()
        return row is not None and row[1] >= row[0]

    wait_for(caught_up, timeout=timeout, what="the Merkle tree to take in the grown chain")
    return time.perf_counter() - start


class Probe:
    """The figures measured at each size of the ledger."""

    def __init__(self, stack: Any, api: Any, tenant_id: str, *, samples: int) -> None:
        self.stack, self.api, self.tenant_id, self.samples = stack, api, tenant_id, samples
        self.pool = ThreadPoolExecutor(8)
        self.ingest_cpu_ms = 0.0

    def submit_p50(self) -> float:
        times, ids = [], []
        for _ in range(self.samples):
            start = time.perf_counter()
            ids.append(self.api.submit("read_repo_file", {"path": FILE}))
            times.append(time.perf_counter() - start)
            self.api.wait(ids[-1], timeout=60)  # one at a time: no backlog under the next
        return _p50(times)

    def runs_list_p50(self) -> float:
        times = []
        for _ in range(self.samples):
            start = time.perf_counter()
            page = self.api.runs(limit=50)
            times.append(time.perf_counter() - start)
            assert len(page) == 50
        return _p50(times)

    def ingest_per_s(self, calls: int) -> float:
        """Results ingested per second, the control alone (its queue filled while stopped);
        the control's CPU per result meanwhile in ``ingest_cpu_ms``."""
        control = self.stack.pid("control")
        results = redis.Redis.from_url(self.stack.services.redis_url)
        os.kill(control, signal.SIGSTOP)
        try:
            runs = list(
                self.pool.map(
                    lambda _: self.api.call("read_repo_file", {"path": FILE}), range(calls)
                )
            )
            ids = [r.run_id for r in runs if r.status == "running"]
            assert len(ids) == calls, [r.nodes[0].error for r in runs if r.status != "running"]
            # The stopped control's pending fetch still takes what arrives first (one
            # message): the rest wait in the queue. The last few still being made when
            # timing starts cost a worker's ~10 ms, against seconds measured.
            wait_for(
                lambda: results.llen("results") >= calls - PREFETCH,
                timeout=300,
                what="the results queued",
            )
        finally:
            os.kill(control, signal.SIGCONT)
        process = psutil.Process(control)
        cpu = sum(process.cpu_times()[:2])
        start = time.perf_counter()
        statuses = self.api.wait_all(ids, timeout=300)
        took = time.perf_counter() - start
        self.ingest_cpu_ms = (sum(process.cpu_times()[:2]) - cpu) * 1000 / calls
        assert set(statuses.values()) == {"completed"}, statuses
        return calls / took

    def verify(self) -> dict[str, float]:
        from control.ops.runtime import ControlPlane
        from ledger.verify import verify_ledger

        plane = ControlPlane(
            self.stack.settings(),
            broker_url=self.stack.services.redis_url,
            database_url=self.stack.services.database_url,
        )
        try:
            with plane.sessions() as session:
                start = time.perf_counter()
                report = verify_ledger(session, plane.keyring(), tenant_id=self.tenant_id)
                took = time.perf_counter() - start
        finally:
            plane.engine.dispose()
        assert report.ok, report.broken[:3]
        return {"events": report.events, "seconds": took, "events_per_s": report.events / took}


def run(
    *, events: int, checkpoint: int, samples: int, ingest_calls: int, progress: Progress
) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="tpgrowth-"))
    services = start_services(tmp)
    stack = None
    try:
        stack = start_stack(services, tmp / "home", workers={"read_repo_file": 2})
        token = stack.tenant("growth")
        api = stack.http(token)
        # the runs to copy, and a first page of runs list before anything is grown
        ids = [api.call("read_repo_file", {"path": FILE}, wait=True).run_id for _ in range(50)]
        with psycopg.connect(_libpq(services.database_url)) as conn:
            tenant_id = conn.execute(
                "SELECT tenant_id FROM runs WHERE id = %s", (ids[0],)
            ).fetchone()[0]  # type: ignore[index]
            template = Template(conn, tenant_id, ids)
        keys = KeyStore(stack.settings().keys_dir)  # the operator's: it signs as the stack did
        cloner = Cloner(
            keys.signer("control"), {"read_repo_file": keys.signer("tool.read_repo_file")}
        )
        probe = Probe(stack, api, tenant_id, samples=samples)
        task = progress.add_task("ledger growth", total=6)

        def measure() -> dict[str, float]:
            figures = {
                "submit_p50_ms": probe.submit_p50(),
                "runs_list_p50_ms": probe.runs_list_p50(),
                "ingest_throughput_per_s": probe.ingest_per_s(ingest_calls),
                "ingest_cpu_ms_per_result": probe.ingest_cpu_ms,  # the control's
            }
            progress.advance(task)
            return figures

        empty = measure()
        grown = grow(services.database_url, tenant_id, template, cloner, checkpoint)
        integration_s = [integrated(services.database_url, tenant_id, timeout=1800)]
        at_checkpoint = probe.verify()
        progress.advance(task)
        before = grown
        grown += grow(services.database_url, tenant_id, template, cloner, events - grown)
        integration_s.append(integrated(services.database_url, tenant_id, timeout=1800))
        progress.advance(task)
        full = measure()
        at_full = probe.verify()
        progress.advance(task)
        return {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "events_grown": grown,
            "events_per_copied_run": template.events_per_copy,
            "tree_catch_up": {  # the control's integrator taking in each bulk load
                "events": [before, grown - before],
                "seconds": integration_s,
            },
            "empty": empty,
            "full": full,
            "verify_checkpoint": at_checkpoint,
            "verify_full": at_full,
            "ratio": {
                "submit_p50_full_to_empty": full["submit_p50_ms"] / empty["submit_p50_ms"],
                "runs_list_p50_full_to_empty": full["runs_list_p50_ms"] / empty["runs_list_p50_ms"],
                "ingest_throughput_full_to_empty": full["ingest_throughput_per_s"]
                / empty["ingest_throughput_per_s"],
                "verify_events_per_s_full_to_checkpoint": at_full["events_per_s"]
                / at_checkpoint["events_per_s"],
            },
        }
    finally:
        if stack is not None:
            stop_stack(stack)
        services.close()
