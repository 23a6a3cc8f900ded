"""`up` hands the control's processes (its ingest and its API) the settings they serve
by: every TOOLPLANE_* of `up`'s own environment is dropped from the children's, so a
setting must be passed on by name or the child silently runs with its default."""

from __future__ import annotations

from pathlib import Path

from control.ops.processes import plan_processes
from control.ops.runtime import ControlPlane
from toolplane.settings import Settings

OWNER_URL = "postgresql+psycopg://owner:owner-secret@db:5432/tp"
RUNTIME_URL = "postgresql+psycopg://tp_runtime:runtime-secret@db:5432/tp"

NOT_THE_CONTROLS = {  # settings of callers, of Flower, of the workers, or of `up` itself
    "token",
    "flower_user",
    "flower_password",
    "flower_port",
    "allow_weak_containment",
    "sandbox_min_layers",
    "sandbox_warm_runners",
    "worker_user",
    "worker_env",
    "worker_metrics_bind",  # each worker's own metrics endpoint
    "worker_metrics_token_file",
    "broker_acl_dir",  # `up` turns it into each process's broker URL
    "runtime_database_url",  # the control's TOOLPLANE_DATABASE_URL
    "api_processes",  # the API's own (the control is told --no-api)
}


def plan(tmp_path: Path, settings: Settings) -> dict[str, dict[str, str]]:
    plane = ControlPlane(settings, broker_url="redis://127.0.0.1:6379/0", database_url=OWNER_URL)
    specs = plan_processes(
        plane, workers={}, flower=False, runtime_database_url=RUNTIME_URL, base_env={}
    )
    return {spec.name: spec.env for spec in specs}


def test_every_setting_of_the_control_reaches_its_processes(tmp_path: Path) -> None:
    for name in ("api_cert", "api_key", "api_client_ca"):
        (tmp_path / name).write_text("x")
    dirs = {"checkpoint_dir": tmp_path / "checkpoints", "artifact_dir": tmp_path / "artifacts"}
    buckets = {
        "checkpoint_store": "s3://ledger-bucket/cp",
        "artifact_store": "s3://ledger-bucket/a",
    }
    for stores, other in ((dirs, buckets), (buckets, dirs)):  # a store is one or the other
        settings = Settings(
            home=tmp_path,
            redis_url="redis://127.0.0.1:6379/1",
            policy_dir=tmp_path,
            workflows_dir=tmp_path,
            api_cert=tmp_path / "api_cert",
            api_key=tmp_path / "api_key",
            api_client_ca=tmp_path / "api_client_ca",
            api_processes=2,
            s3_endpoint_url="http://127.0.0.1:9000",
            s3_region="eu-west-1",
            s3_access_key_id="key-id",
            s3_secret_access_key="key-secret",
            **stores,  # type: ignore[arg-type]
        )
        wanted = {f"TOOLPLANE_{field.upper()}" for field in Settings.model_fields}
        wanted -= {f"TOOLPLANE_{field.upper()}" for field in NOT_THE_CONTROLS | set(other)}
        for name, env in plan(tmp_path, settings).items():
            if name in ("control", "api"):
                missing = wanted - set(env)
                assert not missing, f"{name} is started without {sorted(missing)}"
                assert env["TOOLPLANE_S3_SECRET_ACCESS_KEY"] == "key-secret"


def test_the_control_and_api_processes_run_with_the_operators_values(tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path,
        api_max_connections=50,
        deployment="acme.example/prod",
        checkpoint_interval_s=0,
        witness_urls="https://witness.example/",
        witness_keys="witness.example+1234abcd+AQID",
        api_processes=2,
    )
    for name, env in plan(tmp_path, settings).items():
        ours = {k.removeprefix("TOOLPLANE_").lower(): v for k, v in env.items()}
        ours = {k: v for k, v in ours.items() if k in Settings.model_fields}
        ours.pop("database_url"), ours.pop("broker_url")
        child = Settings(**ours)
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
