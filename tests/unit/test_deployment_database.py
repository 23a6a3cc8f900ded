"""docker/: the database roles of the deployment, checked without a container engine.

The postgres image's init file creates the control's runtime role; the migrate service
(and Job) runs as the owner and names that role, to grant it; the control holds only
the runtime role's URL.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy.engine import make_url

from ledger.roles import runtime_role_name
from tests.unit.test_deployment import (
    DOCKER,
    SERVICES,
    WORKLOADS,
    env_files,
    environment_of,
    of_kind,
    pod_secrets,
    secrets_of,
)

INIT_SQL = DOCKER / "postgres" / "10-runtime-role.sql"
INITDB = "/docker-entrypoint-initdb.d"


def init_role() -> tuple[str, str]:
    """The role the postgres init file creates, and its attributes."""
    statement = " ".join(
        line.strip() for line in INIT_SQL.read_text().splitlines() if not line.startswith("--")
    )
    found = re.search(r"CREATE ROLE (\w+) WITH (.*?) PASSWORD :'(\w+)';", statement)
    assert found, "one CREATE ROLE with the password from a psql variable"
    name, attributes, variable = found.groups()
    assert f'\\set {variable} `cat "$RUNTIME_PASSWORD_FILE"`' in statement
    return name, attributes


def test_the_postgres_init_file_makes_the_runtime_role_with_login_and_nothing_else():
    name, attributes = init_role()
    assert attributes.split() == [
        "LOGIN", "NOSUPERUSER", "NOCREATEDB", "NOCREATEROLE", "NOREPLICATION", "NOBYPASSRLS",
    ]  # fmt: skip
    assert "GRANT" not in INIT_SQL.read_text(), "grants are migrate's (after every upgrade)"
    for env in (
        environment_of(SERVICES["postgres"]),
        {v["name"]: v["value"] for v in postgres_container()["env"]},
    ):
        assert name == runtime_role_name(env["POSTGRES_DB"]), "the name toolplane derives"
        assert env["POSTGRES_USER"] != name


def test_compose_migrates_as_the_owner_and_grants_the_role_the_init_file_made():
    name, _ = init_role()
    postgres = SERVICES["postgres"]
    env = environment_of(postgres)
    (mount,) = [v for v in postgres["volumes"] if isinstance(v, dict)]
    assert (DOCKER / mount["source"]).resolve() == INIT_SQL
    assert mount["target"] == f"{INITDB}/{INIT_SQL.name}" and mount["read_only"] is True
    assert secrets_of(postgres)["postgres_runtime_password"] == env["RUNTIME_PASSWORD_FILE"]
    runtime = make_url(environment_of(SERVICES["migrate"])["TOOLPLANE_RUNTIME_DATABASE_URL"])
    assert runtime.username == name and runtime.password is None
    assert runtime.database == env["POSTGRES_DB"]
    assert "TOOLPLANE_RUNTIME_DATABASE_URL" not in environment_of(SERVICES["control"])


def postgres_container() -> dict[str, Any]:
    (container,) = of_kind("StatefulSet")["postgres"]["spec"]["template"]["spec"]["containers"]
    return container


def test_k8s_migrates_as_the_owner_and_the_control_connects_as_the_runtime_role():
    holders: dict[str, list[str]] = {}
    for name, workload in WORKLOADS.items():
        pod = workload["spec"]["template"]["spec"]
        for secret in pod_secrets(pod):
            if secret.startswith("toolplane-database"):
                holders.setdefault(secret, []).append(name)
                assert env_files(pod)["TOOLPLANE_DATABASE_URL"] == secret, name
    assert holders == {
        "toolplane-database": ["toolplane-migrate"],
        "toolplane-database-runtime": ["control"],
    }
    name, _ = init_role()
    (migrate,) = of_kind("Job")["toolplane-migrate"]["spec"]["template"]["spec"]["containers"]
    env = {v["name"]: v["value"] for v in migrate["env"]}
    runtime = make_url(env["TOOLPLANE_RUNTIME_DATABASE_URL"])
    assert runtime.username == name and runtime.password is None
    postgres = postgres_container()
    pg_env = {v["name"]: v["value"] for v in postgres["env"]}
    assert runtime.database == pg_env["POSTGRES_DB"]
    pod = of_kind("StatefulSet")["postgres"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in postgres["volumeMounts"]}
    init = mounts[INITDB]
    assert init["readOnly"] is True
    assert volumes[init["name"]]["configMap"]["name"] == "toolplane-postgres-init"
    directory, file = pg_env["RUNTIME_PASSWORD_FILE"].rsplit("/", 1)
    assert volumes[mounts[directory]["name"]]["secret"]["secretName"] == "toolplane-postgres"
    assert file == "runtime_password"
