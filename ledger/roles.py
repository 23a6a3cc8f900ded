"""The runtime role: what the control's processes may do in the ledger's database.

Migrations run as the owner, who owns every table, trigger and function. The
control's processes connect as a runtime role that owns nothing, so it can neither
alter nor drop a table or a trigger (nor disable one), and that holds only the
verbs the control uses on each table: it may append evidence and read it, but not
update, delete or truncate it. It is no superuser, so it cannot set
``session_replication_role`` (which would skip the append-only triggers), and it
may not create anything in the schema.

Roles belong to the cluster, not to the schema's history, and every upgrade may
add tables: so the grants are applied by :func:`ensure_runtime_role` after every
upgrade, not by a migration. It sets the role's privileges in the schema to
exactly :data:`RUNTIME_GRANTS` (revoking whatever else it held there), then checks
what the role can really do (PUBLIC's grants and other roles' included) and
refuses, naming the table and the privilege, where that is more.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import psycopg
from psycopg import Cursor, sql
from psycopg.rows import TupleRow
from sqlalchemy import Engine

from ledger.errors import LedgerError

__all__ = [
    "RUNTIME_GRANTS",
    "RuntimeRole",
    "RuntimeRoleError",
    "ensure_runtime_role",
    "runtime_role_name",
]

NAME_MAX_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1
SUFFIX = "_runtime"
LOCK_KEY = "toolplane.runtime_role"

_READ = frozenset({"SELECT"})
_APPEND = frozenset({"SELECT", "INSERT"})
_WRITE = frozenset({"SELECT", "INSERT", "UPDATE"})

# Each table of the ledger's schema and the verbs the control's code uses on it. A
# table added by a migration gets nothing until it is named here (a unit test checks
# that every table of ledger.models is). SELECT ... FOR UPDATE needs UPDATE; an upsert
# (ON CONFLICT DO UPDATE) needs INSERT and UPDATE.
RUNTIME_GRANTS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "alembic_version": _READ,  # which revision the schema is at
        "api_tokens": _WRITE,  # issue; revoke (row locked)
        "approvals": _WRITE,  # request, decide, use, expire
        "attempts": _WRITE,  # dispatch, settle
        "chain_heads": _WRITE,  # the append's upsert and move
        "evidence_events": _APPEND,  # append-only: never UPDATE, DELETE or TRUNCATE
        "freezes": frozenset({"SELECT", "INSERT", "DELETE"}),  # freeze, unfreeze
        "invalid_message_counts": _WRITE,  # counted by ingest's upsert
        "invalid_messages": _WRITE,  # one row per distinct unverified message (upsert)
        "merkle_nodes": _APPEND,  # complete subtrees, written once by the integrator
        "merkle_trees": _WRITE,  # each chain's integrated size and root (row locked)
        "nodes": _WRITE,
        "outbox": frozenset({"SELECT", "INSERT", "UPDATE", "DELETE"}),  # a cancelled job's row
        "policy_versions": _APPEND,
        "principals": _APPEND,  # made when a token is issued
        "run_events": _APPEND,  # inserted by migration 0006's trigger, as the invoking role
        "runs": _WRITE,
        "signing_keys": _WRITE,  # the control registers the key store's public keys
        "tenants": _READ,  # created by an operator (`toolplane tenant create`), as the owner
        "tool_announcements": _APPEND,  # each distinct manifest a worker announced
        "tool_approvals": _WRITE,  # the operator's pin of a tool's manifest (API approval)
        "tool_manifests": _WRITE,  # the manifest in force: an approved announcement
    }
)

# What has_table_privilege knows; MAINTAIN (VACUUM, LOCK TABLE, ...) from PostgreSQL 17.
TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
COLUMN_PRIVILEGES = frozenset({"SELECT", "INSERT", "UPDATE", "REFERENCES"})
ATTRIBUTES = ("SUPERUSER", "CREATEDB", "CREATEROLE", "REPLICATION", "BYPASSRLS")


class RuntimeRoleError(LedgerError):
    """The runtime role cannot be made, or could do more than the control needs."""

    def __init__(self, role: str, problem: str) -> None:
        super().__init__(f"runtime role {role!r}: {problem}")
        self.role = role
        self.problem = problem


@dataclass(frozen=True)
class RuntimeRole:
    """What :func:`ensure_runtime_role` did: the role, whether it made it, the tables granted."""

    name: str
    created: bool
    schema: str
    tables: tuple[str, ...]


def runtime_role_name(database: str) -> str:
    """``<database>_runtime``, or, past 63 bytes, a prefix and a hash of the whole name
    (role names are cluster-wide: two databases never share a runtime role)."""
    if not database:
        raise RuntimeRoleError(SUFFIX, "the database name is empty")
    name = database + SUFFIX
    if len(name.encode()) <= NAME_MAX_BYTES:
        return name
    tag = "_" + hashlib.sha256(database.encode()).hexdigest()[:8] + SUFFIX
    prefix = database.encode()[: NAME_MAX_BYTES - len(tag)].decode("utf-8", "ignore")
    return prefix + tag


def ensure_runtime_role(
    engine: Engine,
    *,
    role: str,
    password: str | None,
    grants: Mapping[str, frozenset[str]] = RUNTIME_GRANTS,
) -> RuntimeRole:
    """Make ``role`` the control's role in the owner's database and schema, in one
    transaction, with ``engine`` connected as the owner.

    With a ``password``, the role is created if missing (LOGIN, no other attribute)
    and given that password (again on every run, so a rerun never locks the control
    out); without one, it must exist already (made by the deployment). Either way its
    privileges in the schema become exactly ``grants`` (tables that do not exist yet
    are skipped: the next run after the upgrade that makes them grants them).
    """
    with engine.begin() as connection:
        raw = connection.connection.driver_connection
        assert isinstance(raw, psycopg.Connection)
        with raw.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (LOCK_KEY,))
            try:
                if role == _one(cursor, "SELECT current_user"):
                    raise RuntimeRoleError(
                        role, "is the owner that runs the migrations; name another role"
                    )
                created = _make_role(raw, cursor, role, password)
                _check_role(cursor, role)
                schema, tables = _grant(cursor, role, grants)
                _check_privileges(cursor, role, tables, grants)
            except psycopg.errors.InsufficientPrivilege as e:
                raise RuntimeRoleError(
                    role, f"the owner may not set it up ({e.diag.message_primary})"
                ) from e
    return RuntimeRole(name=role, created=created, schema=schema, tables=tables)


def _make_role(
    raw: psycopg.Connection[TupleRow],
    cursor: Cursor[TupleRow],
    role: str,
    password: str | None,
) -> bool:
    """Create the role or set its password; True if it was created."""
    cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
    exists = cursor.fetchone() is not None
    if password is None:
        if not exists:
            raise RuntimeRoleError(
                role,
                "does not exist; create it (LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
                "NOREPLICATION NOBYPASSRLS) or leave TOOLPLANE_RUNTIME_DATABASE_URL unset",
            )
        return False
    if not password:
        raise RuntimeRoleError(role, "the password is empty")
    # The verifier, not the password, goes to the server (and so to any statement log).
    verifier = raw.pgconn.encrypt_password(password.encode(), role.encode(), None).decode()
    name, secret = sql.Identifier(role), sql.Literal(verifier)
    if exists:
        cursor.execute(sql.SQL("ALTER ROLE {} WITH LOGIN PASSWORD {}").format(name, secret))
    else:
        cursor.execute(
            sql.SQL(
                "CREATE ROLE {} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION "
                "NOBYPASSRLS PASSWORD {}"
            ).format(name, secret)
        )
    return not exists


def _check_role(cursor: Cursor[TupleRow], role: str) -> None:
    """No attribute beyond LOGIN, no membership, and it owns nothing here."""
    cursor.execute(
        "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls"
        " FROM pg_roles WHERE rolname = %s",
        (role,),
    )
    row = cursor.fetchone()
    assert row is not None
    if not row[0]:
        raise RuntimeRoleError(role, "has NOLOGIN: the control could not connect")
    held = [label for label, value in zip(ATTRIBUTES, row[1:], strict=True) if value]
    if held:
        raise RuntimeRoleError(role, f"has {', '.join(held)}: the control needs none of them")
    cursor.execute(
        "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid "
        "JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = %s ORDER BY 1",
        (role,),
    )
    groups = [str(g) for (g,) in cursor.fetchall()]
    if groups:
        raise RuntimeRoleError(
            role, f"is a member of {', '.join(groups)}: it would hold their rights too"
        )
    cursor.execute(
        "SELECT kind || ' ' || name FROM ("
        " SELECT 'database' AS kind, datname::text AS name, datdba AS owner FROM pg_database"
        "  WHERE datname = current_database()"
        " UNION ALL SELECT 'schema', nspname::text, nspowner FROM pg_namespace"
        "  WHERE nspname = current_schema()"
        " UNION ALL SELECT 'relation', relname::text, relowner FROM pg_class"
        "  WHERE relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())"
        " UNION ALL SELECT 'function', proname::text, proowner FROM pg_proc"
        "  WHERE pronamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())"
        ") o JOIN pg_roles r ON r.oid = o.owner WHERE r.rolname = %s ORDER BY 1",
        (role,),
    )
    owned = [str(o) for (o,) in cursor.fetchall()]
    if owned:
        raise RuntimeRoleError(
            role, f"owns {', '.join(owned[:5])}: an owner may alter and drop what it owns"
        )


def _grant(
    cursor: Cursor[TupleRow],
    role: str,
    grants: Mapping[str, frozenset[str]],
) -> tuple[str, tuple[str, ...]]:
    """Privileges of ``role`` in the current schema := ``grants``; the schema and tables."""
    schema = str(_one(cursor, "SELECT current_schema()"))
    name, space = sql.Identifier(role), sql.Identifier(schema)
    database = sql.Identifier(str(_one(cursor, "SELECT current_database()")))
    cursor.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(database, name))
    cursor.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(space, name))
    if _public_may_create(cursor):  # servers before 15 grant it by default
        cursor.execute(sql.SQL("REVOKE CREATE ON SCHEMA {} FROM PUBLIC").format(space))
    for kind in ("TABLES", "SEQUENCES", "FUNCTIONS"):
        cursor.execute(
            sql.SQL("REVOKE ALL ON ALL {} IN SCHEMA {} FROM {}").format(sql.SQL(kind), space, name)
        )
    cursor.execute(
        "SELECT relname FROM pg_class"
        " WHERE relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())"
        " AND relkind IN ('r', 'p') AND relname = ANY(%s) ORDER BY 1",
        (sorted(grants),),
    )
    tables = tuple(str(t) for (t,) in cursor.fetchall())
    for table in tables:
        verbs = sql.SQL(", ").join(sql.SQL(verb) for verb in sorted(grants[table]))
        cursor.execute(
            sql.SQL("GRANT {} ON TABLE {} TO {}").format(verbs, sql.Identifier(schema, table), name)
        )
    # A serial column's default calls nextval(), which needs USAGE on its sequence; an
    # identity column's does not.
    inserting = [t for t in tables if "INSERT" in grants[t]]
    cursor.execute(
        "SELECT s.relname FROM pg_depend d JOIN pg_class s ON s.oid = d.objid "
        "JOIN pg_class t ON t.oid = d.refobjid WHERE s.relkind = 'S' AND d.deptype = 'a' "
        "AND t.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema()) "
        "AND t.relname = ANY(%s) ORDER BY 1",
        (inserting,),
    )
    for (sequence,) in cursor.fetchall():
        cursor.execute(
            sql.SQL("GRANT USAGE ON SEQUENCE {} TO {}").format(
                sql.Identifier(schema, str(sequence)), name
            )
        )
    return schema, tables


def _public_may_create(cursor: Cursor[TupleRow]) -> bool:
    return bool(
        _one(
            cursor,
            "SELECT EXISTS (SELECT 1 FROM pg_namespace n, "
            "aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) a "
            "WHERE n.nspname = current_schema() AND a.grantee = 0 "
            "AND a.privilege_type = 'CREATE')",
        )
    )


def _check_privileges(
    cursor: Cursor[TupleRow],
    role: str,
    tables: tuple[str, ...],
    grants: Mapping[str, frozenset[str]],
) -> None:
    """What the role can do now, from any source (PUBLIC, a grant on a column), is what
    ``grants`` says, and nothing more."""
    version = int(str(_one(cursor, "SHOW server_version_num")))
    privileges = [*TABLE_PRIVILEGES, *(["MAINTAIN"] if version >= 170000 else [])]
    cursor.execute(
        "SELECT c.relname, p.name, CASE WHEN p.name = ANY(%(columns)s)"
        " THEN has_any_column_privilege(%(role)s, c.oid, p.name)"
        " ELSE has_table_privilege(%(role)s, c.oid, p.name) END"
        " FROM pg_class c CROSS JOIN unnest(%(privileges)s::text[]) AS p(name)"
        " WHERE c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())"
        " AND c.relname = ANY(%(tables)s) ORDER BY 1, 2",
        {
            "role": role,
            "columns": sorted(COLUMN_PRIVILEGES),
            "privileges": privileges,
            "tables": list(tables),
        },
    )
    for table, privilege, held in cursor.fetchall():
        wanted = privilege in grants[str(table)]
        if held and not wanted:
            raise RuntimeRoleError(
                role,
                f"{table}: holds {privilege}, which it must not (granted to PUBLIC, or on a "
                "column?); revoke it",
            )
        if wanted and not held:
            raise RuntimeRoleError(role, f"{table}: {privilege} was granted but is not held")
    if _one(cursor, "SELECT has_schema_privilege(%s, current_schema(), 'CREATE')", role):
        raise RuntimeRoleError(role, "may create objects in the schema; revoke CREATE")
    if _one(cursor, "SELECT has_database_privilege(%s, current_database(), 'CREATE')", role):
        raise RuntimeRoleError(role, "may create schemas in the database; revoke CREATE")
    if version >= 150000 and _one(
        cursor, "SELECT has_parameter_privilege(%s, 'session_replication_role', 'SET')", role
    ):
        raise RuntimeRoleError(
            role, "may SET session_replication_role (which skips triggers); revoke it"
        )


def _one(cursor: Cursor[TupleRow], query: str, *args: object) -> object:
    cursor.execute(query, args or None)
    row = cursor.fetchone()
    assert row is not None
    return row[0]
