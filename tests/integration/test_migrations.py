"""Upgrading the ledger with work in flight: a job dispatched before 0004 still binds."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session

from ledger.migrate import upgrade
from ledger.models import Attempt, Node
from tests.harness import Services, _libpq

pytestmark = pytest.mark.integration


@pytest.fixture
def fresh_database(services: Services) -> Iterator[Engine]:
    name = f"tp_mig_{secrets.token_hex(5)}"
    with psycopg.connect(_libpq(services.admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(services.admin_url).set(database=name, drivername="postgresql+psycopg")
    engine = create_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()
        with psycopg.connect(_libpq(services.admin_url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_job_in_flight_across_the_upgrade_gets_its_attempt(fresh_database: Engine) -> None:
    upgrade(fresh_database, "0003")
    now = datetime.now(UTC)
    expires_ms = int(now.timestamp() * 1000) + 100_000
    with fresh_database.begin() as conn:
        for statement in (
            "INSERT INTO tenants (id, name, created_at) VALUES ('t1', 'acme', :now)",
            "INSERT INTO principals (id, tenant_id, name, role, created_at)"
            " VALUES ('p1', 't1', 'admin', 'admin', :now)",
            "INSERT INTO runs (id, tenant_id, principal_id, workflow, status, environment,"
            " classification, created_at, updated_at)"
            " VALUES ('r1', 't1', 'p1', 'call', 'running', 'dev', 'internal', :now, :now)",
        ):
            conn.execute(text(statement), {"now": now})
        conn.execute(
            text(
                "INSERT INTO nodes (run_id, node_id, tool, args, args_sha256, status, attempt,"
                " envelope, envelope_sha256, created_at, updated_at) VALUES"
                " ('r1', 'sleepy', 'sleepy', '{}', 'a', 'queued', 1,"
                " CAST(:envelope AS jsonb), 'e1', :now, :now),"
                " ('r1', 'done', 'sleepy', '{}', 'a', 'completed', 1,"
                " CAST(:envelope AS jsonb), 'e2', :now, :now)"
            ),
            {"now": now, "envelope": f'{{"envelope": {{"expires_at": {expires_ms}}}}}'},
        )
    upgrade(fresh_database)
    with Session(fresh_database) as session:
        attempts = session.scalars(select(Attempt)).all()
        assert [(a.node_id, a.attempt, a.job_id, a.status) for a in attempts] == [
            ("sleepy", 1, "r1/sleepy/1", "queued")
        ]
        assert attempts[0].envelope_sha256 == "e1"
        assert int(attempts[0].expires_at.timestamp() * 1000) == expires_ms
        assert (attempts[0].due_at - attempts[0].expires_at).total_seconds() == 60
        node = session.get(Node, ("r1", "sleepy"))
        assert node is not None and node.due_at == attempts[0].due_at and node.needs == []
