"""`up` hands the control's processes (its ingest and its API) the settings they serve
by: every TOOLPLANE_* of `up`'s own environment is dropped from the children's, so a
setting must be passed on by name or the child falls back to its default."""

from __future__ import annotations

from pathlib import Path

from control.ops.processes import plan_processes
from control.ops.runtime import ControlPlane
from toolplane.settings import Settings

OWNER_URL = "postgresql+psycopg://owner:owner-secret@db:5432/tp"
RUNTIME_URL = "postgresql+psycopg://tp_runtime:runtime-secret@db:5432/tp"


def test_the_control_and_api_processes_get_the_operators_settings(tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path,
        api_max_connections=50,
        deployment="acme.example/prod",
        checkpoint_interval_s=0,
        witness_urls="https://witness.example/",
        witness_keys="witness.example+1234abcd+AQID",
        api_processes=2,
    )
    plane = ControlPlane(settings, broker_url="redis://127.0.0.1:6379/0", database_url=OWNER_URL)
    specs = plan_processes(
        plane,
        workers={},
        flower=False,
        runtime_database_url=RUNTIME_URL,
        base_env={"PATH": "/bin"},
    )
    by_name = {spec.name: spec for spec in specs}
    for name in ("control", "api"):
        env = by_name[name].env
        child = Settings(
            **{
                k.removeprefix("TOOLPLANE_").lower(): v
                for k, v in env.items()
                if k.startswith("TOOLPLANE_")
                and k != "TOOLPLANE_DATABASE_URL"
                and k != "TOOLPLANE_BROKER_URL"
            }
        )
        differs = {
            field: (getattr(settings, field), getattr(child, field))
            for field in (
                "api_max_connections",
                "deployment",
                "checkpoint_interval_s",
                "witness_urls",
                "witness_keys",
            )
            if getattr(settings, field) != getattr(child, field)
        }
        assert not differs, f"{name} runs with (ours, its): {differs}"
