"""Least privilege in PostgreSQL: the control's processes run as a runtime role that may
append evidence but not change it, and owns nothing it could alter or drop."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest
from psycopg import sql
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from control.ops.runtime_database import ensure_runtime_url, password_path
from ledger.chain import NewEvent
from ledger.db import normalize_url
from ledger.migrate import upgrade
from ledger.models import EvidenceEvent
from ledger.roles import RUNTIME_GRANTS, RuntimeRoleError, runtime_role_name
from ledger.store import append_events
from tests.harness import REPO, Services, Stack, _libpq, wait_for
from toolplane.errors import SettingsError
from toolplane.settings import Settings

pytestmark = pytest.mark.integration


def connect(url: str) -> psycopg.Connection:
    return psycopg.connect(_libpq(url), autocommit=True)


@pytest.fixture
def runtime(stack: Stack, token: str) -> Iterator[psycopg.Connection]:
    """A connection as the stack's runtime role, with evidence in the table."""
    stack.client(token).call("search_docs", {"query": "cedar"}, wait=True)
    conn = connect(stack.runtime_url)
    try:
        yield conn
    finally:
        conn.close()


EVIDENCE_REFUSED = "permission denied for table evidence_events"
EVIDENCE_OWNER = "must be owner of table evidence_events"


@pytest.mark.parametrize(
    ("statement", "message"),
    [
        ("UPDATE evidence_events SET kind = kind", EVIDENCE_REFUSED),
        ("DELETE FROM evidence_events WHERE id = (SELECT max(id) FROM evidence_events)",
         EVIDENCE_REFUSED),
        ("TRUNCATE evidence_events", EVIDENCE_REFUSED),
        ("ALTER TABLE evidence_events ADD COLUMN note text", EVIDENCE_OWNER),
        ("ALTER TABLE evidence_events DISABLE TRIGGER ALL", EVIDENCE_OWNER),
        ("ALTER TABLE evidence_events DISABLE TRIGGER evidence_events_no_update_delete",
         EVIDENCE_OWNER),
        ("ALTER TABLE evidence_events DISABLE TRIGGER evidence_events_no_truncate",
         EVIDENCE_OWNER),
        ("DROP TRIGGER evidence_events_no_update_delete ON evidence_events",
         "must be owner of relation evidence_events"),
        ("DROP TABLE evidence_events", EVIDENCE_OWNER),
        ("ALTER TABLE signing_keys DISABLE TRIGGER signing_keys_keep_revocation",
         "must be owner of table signing_keys"),  # no un-revoking a key around it
        ("DROP TABLE chain_heads", "must be owner of table chain_heads"),
        ("CREATE OR REPLACE FUNCTION evidence_events_append_only() RETURNS trigger"
         " LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$",
         "permission denied for schema public"),  # checked before the function's owner
        ("SET session_replication_role = replica",
         'permission denied to set parameter "session_replication_role"'),
        ("CREATE TABLE sneaky (a int)", "permission denied for schema public"),
        ("UPDATE alembic_version SET version_num = version_num",
         "permission denied for table alembic_version"),
    ],
)  # fmt: skip
def test_the_runtime_role_is_refused_by_postgresql(
    runtime: psycopg.Connection, statement: str, message: str
) -> None:
    assert runtime.execute("SELECT count(*) FROM evidence_events").fetchone()[0] > 0
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as refused:
        runtime.execute(statement)
    assert refused.value.sqlstate == "42501"
    # PostgreSQL's own privilege checks, not the append-only trigger's refusal
    assert refused.value.diag.message_primary == message


def test_what_the_runtime_role_may_do_it_can(runtime: psycopg.Connection) -> None:
    """The refusals above are not blanket ones: the control's own verbs work."""
    runtime.execute("UPDATE chain_heads SET seq = seq")
    runtime.execute("SELECT version_num FROM alembic_version").fetchone()
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        runtime.execute("DELETE FROM tenants WHERE false")  # tenants are the operator's


def test_the_runtime_role_appends_evidence(stack: Stack, token: str) -> None:
    tenant = stack.client(token).identity.tenant_id  # a fresh tenant's chain: no one else's
    payload = {"problem": "appended by test_db_roles as the runtime role"}
    engine = create_engine(normalize_url(stack.runtime_url))
    try:
        with Session(engine) as session:
            assert session.scalar(text("SELECT current_user")) == runtime_role_name(
                stack.services.database
            )
            ((chain, seq),) = append_events(
                session, [NewEvent("PolicyBundleRefused", payload, tenant_id=tenant)]
            )
            session.commit()
            row = session.scalar(
                select(EvidenceEvent).where(
                    EvidenceEvent.chain_id == chain, EvidenceEvent.seq == seq
                )
            )
            assert row is not None and row.payload == payload
    finally:
        engine.dispose()
    assert stack.client(token).verify_ledger().ok  # the chain it extended still verifies


def test_the_control_connects_as_the_runtime_role(stack: Stack) -> None:
    role = runtime_role_name(stack.services.database)
    control = psutil.Process(stack.pid("control"))
    assert make_url(control.environ()["TOOLPLANE_DATABASE_URL"]).username == role
    if make_url(stack.runtime_url).query.get("host"):
        pytest.skip("PostgreSQL on a unix socket: its sessions cannot be matched to a pid")
    port = make_url(stack.runtime_url).port or 5432
    with connect(stack.services.database_url) as owner:

        def sessions() -> dict[int, str]:
            ours = {
                c.laddr.port
                for p in [control, *control.children(recursive=True)]
                for c in p.net_connections(kind="tcp")
                if c.raddr and c.raddr.port == port
            }
            rows = owner.execute(
                "SELECT client_port, usename FROM pg_stat_activity "
                "WHERE datname = current_database() AND client_port = ANY(%s)",
                (sorted(ours),),
            ).fetchall()
            return dict(rows)

        found = wait_for(sessions, timeout=20, what="the control's database sessions")
    assert set(found.values()) == {role}, found


def test_the_api_works_as_the_runtime_role(stack: Stack, token: str) -> None:
    """What callers do through the API, which runs in the control process as the runtime
    role: issue and revoke tokens, call, approve, freeze, cancel, verify."""
    admin = stack.http(token)
    submitter = admin.issue_token("sam", "submitter")
    sam = stack.http(submitter.token)
    rita = stack.http(admin.issue_token("rita", "approver").token)
    assert sam.call("search_docs", {"query": "hash"}, wait=True).status == "completed"
    waiting = sam.call("read_repo_file", {"path": "README.md"}, environment="prod")
    assert waiting.status == "awaiting_approval", waiting
    assert rita.approve(waiting.run_id, "read_repo_file").status == "granted"
    assert sam.wait(waiting.run_id, timeout=60).status == "completed"
    admin.freeze(reason="a drill")
    assert sam.call("search_docs", {"query": "x"}).status == "denied"
    admin.unfreeze(reason="over")
    slow = sam.call("sleepy", {"seconds": 5, "tag": secrets.token_hex(3)})
    assert sam.cancel(slow.run_id, reason="no longer needed").status == "cancelled"
    admin.revoke_token(submitter.token_id)
    assert admin.verify_ledger().ok


def test_migrate_again_keeps_the_control_working(stack: Stack, token: str) -> None:
    done = stack.cli("migrate")
    assert done.returncode == 0, done.stderr
    role = runtime_role_name(stack.services.database)
    assert f"runtime role {role}: granted on {len(RUNTIME_GRANTS)} tables" in done.stdout
    client = stack.client(token)
    assert client.call("search_docs", {"query": "keys"}, wait=True).status == "completed"


# -- ensuring the role on a database of its own ---------------------------------------------


@pytest.fixture
def fresh(services: Services) -> Iterator[Engine]:
    """A migrated database of its own (as the owner); its runtime role is dropped after."""
    name = f"tp_roles_{secrets.token_hex(5)}"
    with connect(services.admin_url) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_url(services.admin_url).set(database=name)
    engine = create_engine(normalize_url(url.render_as_string(hide_password=False)))
    upgrade(engine)
    try:
        yield engine
    finally:
        engine.dispose()
        with connect(services.admin_url) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
            for role in (runtime_role_name(name), f"{name}_made", f"{name}_super"):
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def settings_for(home: Path, runtime_url: str | None = None) -> Settings:
    return Settings(home=home, runtime_database_url=runtime_url)


def scram_verifies(verifier: str, password: str) -> bool:
    """Whether PostgreSQL's stored SCRAM-SHA-256 verifier is that of ``password`` (RFC 5802)."""
    method, salted, keys = verifier.split("$")
    assert method == "SCRAM-SHA-256"
    iterations, salt = salted.split(":")
    stored_key = base64.b64decode(keys.split(":")[0])
    key = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
    client_key = hmac.new(key, b"Client Key", "sha256").digest()
    return hashlib.sha256(client_key).digest() == stored_key


def verifier_of(engine: Engine, role: str) -> str:
    with engine.connect() as conn:
        return str(
            conn.execute(
                text("SELECT rolpassword FROM pg_authid WHERE rolname = :r"), {"r": role}
            ).scalar_one()
        )


def privileges(engine: Engine, role: str, table: str) -> set[str]:
    with engine.connect() as conn:
        return {
            p
            for p in ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
            if conn.execute(
                text("SELECT has_table_privilege(:r, :t, :p)"), {"r": role, "t": table, "p": p}
            ).scalar()
        }


def test_a_rerun_is_a_no_op_that_keeps_the_password(fresh: Engine, tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    url, role = ensure_runtime_url(settings, fresh)
    assert role.created and role.name == runtime_role_name(str(fresh.url.database))
    assert set(role.tables) == set(RUNTIME_GRANTS)
    kept = password_path(tmp_path, role.name)
    assert kept.stat().st_mode & 0o777 == 0o600
    assert make_url(url).password == kept.read_text().strip()
    assert scram_verifies(verifier_of(fresh, role.name), kept.read_text().strip())
    before = {t: privileges(fresh, role.name, t) for t in RUNTIME_GRANTS}

    again, second = ensure_runtime_url(settings, fresh)
    assert again == url and not second.created
    assert scram_verifies(verifier_of(fresh, role.name), kept.read_text().strip())
    assert {t: privileges(fresh, role.name, t) for t in RUNTIME_GRANTS} == before
    assert before["evidence_events"] == {"SELECT", "INSERT"}
    with connect(url) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (role.name,)


def test_a_table_added_later_gets_its_grants_at_the_next_ensure(
    fresh: Engine, tmp_path: Path
) -> None:
    from ledger.roles import ensure_runtime_role

    name = runtime_role_name(str(fresh.url.database))
    grants = {**RUNTIME_GRANTS, "later_things": frozenset({"SELECT", "INSERT"})}
    first = ensure_runtime_role(fresh, role=name, password="pw", grants=grants)
    assert "later_things" not in first.tables  # not there yet: skipped
    with fresh.begin() as conn:  # the next release's migration
        conn.execute(text("CREATE TABLE later_things (id bigserial PRIMARY KEY, note text)"))
    url = make_url(fresh.url).set(username=name, password="pw")
    with connect(url.render_as_string(hide_password=False)) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO later_things (note) VALUES ('x')")
        second = ensure_runtime_role(fresh, role=name, password="pw", grants=grants)
        assert "later_things" in second.tables
        conn.execute("INSERT INTO later_things (note) VALUES ('x')")  # and its serial's sequence
        assert conn.execute("SELECT count(*) FROM later_things").fetchone() == (1,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM later_things")
    # A table that no one declared gets nothing.
    ensure_runtime_role(fresh, role=name, password="pw")
    assert privileges(fresh, name, "later_things") == set()


def test_the_grants_are_set_exactly_and_a_wider_grant_is_refused(
    fresh: Engine, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path)
    _, role = ensure_runtime_url(settings, fresh)
    with fresh.begin() as conn:  # drift: someone granted more by hand
        conn.execute(text(f'GRANT UPDATE, TRUNCATE ON evidence_events TO "{role.name}"'))
        conn.execute(text("GRANT CREATE ON SCHEMA public TO PUBLIC"))  # as before PostgreSQL 15
    ensure_runtime_url(settings, fresh)
    assert privileges(fresh, role.name, "evidence_events") == {"SELECT", "INSERT"}
    with fresh.connect() as conn:
        assert not conn.execute(
            text("SELECT has_schema_privilege(:r, 'public', 'CREATE')"), {"r": role.name}
        ).scalar()
    with fresh.begin() as conn:  # a grant to everyone cannot be revoked from one role
        conn.execute(text("GRANT UPDATE ON evidence_events TO PUBLIC"))
    with pytest.raises(RuntimeRoleError, match="evidence_events: holds UPDATE"):
        ensure_runtime_url(settings, fresh)


def test_a_named_runtime_url_creates_nothing(fresh: Engine, tmp_path: Path) -> None:
    database = str(fresh.url.database)
    made, superuser = f"{database}_made", f"{database}_super"
    base = make_url(fresh.url)
    named = base.set(username=made, password="theirs").render_as_string(hide_password=False)
    with pytest.raises(RuntimeRoleError, match="does not exist"):
        ensure_runtime_url(settings_for(tmp_path, named), fresh)
    with fresh.begin() as conn:
        conn.execute(text(f"CREATE ROLE \"{made}\" LOGIN PASSWORD 'theirs'"))
        conn.execute(text(f'CREATE ROLE "{superuser}" LOGIN SUPERUSER'))
    before = verifier_of(fresh, made)
    url, role = ensure_runtime_url(settings_for(tmp_path, named), fresh)
    assert url == named and role.name == made and not role.created
    assert verifier_of(fresh, made) == before, "its password is the deployment's"
    assert not (tmp_path / "database").exists()
    assert privileges(fresh, made, "evidence_events") == {"SELECT", "INSERT"}
    with connect(named) as conn:
        conn.execute("SELECT count(*) FROM evidence_events")

    with pytest.raises(RuntimeRoleError, match="has SUPERUSER"):
        ensure_runtime_url(settings_for(tmp_path, str(base.set(username=superuser))), fresh)
    with pytest.raises(RuntimeRoleError, match="is the owner"):
        ensure_runtime_url(settings_for(tmp_path, str(base)), fresh)
    elsewhere = base.set(username=made, database="postgres")
    with pytest.raises(SettingsError, match="TOOLPLANE_RUNTIME_DATABASE_URL: names database"):
        ensure_runtime_url(settings_for(tmp_path, str(elsewhere)), fresh)


# -- the embedded PostgreSQL (pgserver, trust over a unix socket) -----------------------------


@pytest.mark.timeout(180)
def test_the_compose_init_file_then_migrate_then_the_runtime_url_on_embedded_postgresql() -> None:
    """On a cluster of its own: docker/'s init file makes the role, migrate (named URL)
    grants it, the control's URL works over the socket; then `up`'s way finds it made."""
    from control.ops.embedded import _package_dir, start_embedded, stop_embedded

    home = Path(tempfile.mkdtemp(prefix="tproles"))
    try:
        urls = start_embedded(home)
        owner_url = make_url(urls.database_url)
        (home / "runtime_password").write_text("from-the-secret-file\n")
        psql = _package_dir("pgserver") / "pginstall" / "bin" / "psql"
        init = REPO / "docker" / "postgres" / "10-runtime-role.sql"
        done = subprocess.run(
            [str(psql), "-X", "-q", "-h", str(owner_url.query["host"]), "-U", "postgres"]
            + ["-d", "toolplane", "-f", str(init)],
            env={
                "PATH": os.environ["PATH"],
                "RUNTIME_PASSWORD_FILE": str(home / "runtime_password"),
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        owner = create_engine(urls.database_url)
        try:
            upgrade(owner)
            assert scram_verifies(verifier_of(owner, "toolplane_runtime"), "from-the-secret-file")
            named = owner_url.set(username="toolplane_runtime", password="from-the-secret-file")
            url, role = ensure_runtime_url(
                settings_for(home, named.render_as_string(hide_password=False)), owner
            )
            assert not role.created and make_url(url).query == owner_url.query
            runtime = create_engine(url)
            try:
                with Session(runtime) as session:
                    assert session.scalar(text("SELECT current_user")) == "toolplane_runtime"
                    append_events(session, [NewEvent("PolicyBundleRefused", {"problem": "x"})])
                    session.commit()
                    assert session.scalar(select(func.count()).select_from(EvidenceEvent)) == 1
                with runtime.connect() as conn, pytest.raises(Exception, match="permission denied"):
                    conn.execute(text("DELETE FROM evidence_events"))
            finally:
                runtime.dispose()
            derived, again = ensure_runtime_url(settings_for(home), owner)  # as `up` does
            assert again.name == "toolplane_runtime" and not again.created
            with connect(derived) as conn:
                assert conn.execute("SELECT current_user").fetchone() == ("toolplane_runtime",)
        finally:
            owner.dispose()
    finally:
        stop_embedded(home)
        shutil.rmtree(home, ignore_errors=True)
