"""The runtime role's name, its declared grants, its password file, and who gets which URL."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from control.ops.processes import plan_processes
from control.ops.runtime import ControlPlane
from control.ops.runtime_database import ensure_runtime_url, password_path, runtime_password
from ledger.models import Base
from ledger.roles import RUNTIME_GRANTS, RuntimeRoleError, runtime_role_name
from toolplane.errors import SettingsError
from toolplane.settings import Settings

OWNER_URL = "postgresql+psycopg://owner:owner-secret@db:5432/tp"
RUNTIME_URL = "postgresql+psycopg://tp_runtime:runtime-secret@db:5432/tp"


def test_the_role_is_named_for_its_database() -> None:
    assert runtime_role_name("toolplane") == "toolplane_runtime"
    assert runtime_role_name('we"ird db') == 'we"ird db_runtime'  # quoted where it is used


def test_a_long_database_name_gives_a_distinct_name_within_63_bytes() -> None:
    first, second = "d" * 60 + "one", "d" * 60 + "two"
    names = {runtime_role_name(first), runtime_role_name(second)}
    assert len(names) == 2
    for name in names:
        assert len(name.encode()) <= 63 and name.endswith("_runtime")
    assert runtime_role_name(first) == runtime_role_name(first)
    wide = runtime_role_name("é" * 40)  # 80 bytes: never cut inside a character
    assert len(wide.encode()) <= 63 and wide.encode().decode() == wide
    assert runtime_role_name("x" * 55) == "x" * 55 + "_runtime"  # exactly 63 bytes
    with pytest.raises(RuntimeRoleError, match="empty"):
        runtime_role_name("")


def test_every_table_of_the_ledger_has_its_grants_declared() -> None:
    """A migration that adds a table must say what the control may do with it."""
    assert set(RUNTIME_GRANTS) == set(Base.metadata.tables) | {"alembic_version"}
    for table, verbs in RUNTIME_GRANTS.items():
        assert verbs and verbs <= {"SELECT", "INSERT", "UPDATE", "DELETE"}, table
    assert RUNTIME_GRANTS["evidence_events"] == {"SELECT", "INSERT"}
    assert RUNTIME_GRANTS["alembic_version"] == {"SELECT"}
    assert RUNTIME_GRANTS["run_events"] == {"SELECT", "INSERT"}  # the trigger inserts as it


def test_only_the_control_gets_a_database_url_and_it_is_the_runtime_roles(tmp_path: Path) -> None:
    plane = ControlPlane(
        Settings(home=tmp_path), broker_url="redis://127.0.0.1:6379/0", database_url=OWNER_URL
    )
    specs = plan_processes(
        plane,
        workers={"lint_python": 1, "search_docs": 2},
        flower=True,
        runtime_database_url=RUNTIME_URL,
        base_env={"PATH": "/bin", "TOOLPLANE_DATABASE_URL": OWNER_URL},
    )
    by_name = {spec.name: spec for spec in specs}
    controls = {"control", "api"}  # the control's own processes: its ingest, its API
    assert controls <= set(by_name)
    for name in controls:
        assert by_name[name].env["TOOLPLANE_DATABASE_URL"] == RUNTIME_URL
    for spec in specs:
        assert not any("owner-secret" in value for value in spec.env.values()), spec.name
        assert not any("owner-secret" in arg for arg in spec.argv), spec.name
        if spec.name not in controls:
            assert "TOOLPLANE_DATABASE_URL" not in spec.env, spec.name


def test_the_password_is_made_once_and_kept_private(tmp_path: Path) -> None:
    first = runtime_password(tmp_path, "tp_runtime")
    path = password_path(tmp_path, "tp_runtime")
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert len(first) >= 32 and runtime_password(tmp_path, "tp_runtime") == first
    assert runtime_password(tmp_path, "other_runtime") != first
    path.write_text("\n")
    with pytest.raises(SettingsError, match="is empty; delete it"):
        runtime_password(tmp_path, "tp_runtime")
    (tmp_path / "file").write_text("")  # a HOME that cannot hold it (read-only, say)
    with pytest.raises(SettingsError, match="TOOLPLANE_HOME: cannot keep the runtime role"):
        runtime_password(tmp_path / "file", "tp_runtime")


@pytest.mark.parametrize(
    ("named", "rule"),
    [
        ("postgresql://db:5432/tp", "must name the runtime role as its user"),
        ("postgresql://tp_runtime:pw@db:5432/other", "names database 'other'"),
        ("not a url", "not a database URL"),
    ],
)
def test_a_named_runtime_url_is_checked_before_the_database_is_touched(
    tmp_path: Path, named: str, rule: str
) -> None:
    engine = create_engine(make_url(OWNER_URL).set(host="192.0.2.1"))  # nothing answers there
    with pytest.raises(SettingsError, match=f"TOOLPLANE_RUNTIME_DATABASE_URL: {rule}"):
        ensure_runtime_url(Settings(home=tmp_path, runtime_database_url=named), engine)
