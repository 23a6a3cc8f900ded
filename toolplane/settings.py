"""Settings from the environment (prefix ``TOOLPLANE_``), built once per process."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from toolplane.lifetimes import MAX_ENVELOPE_LIFETIME_S
from toolplane.s3url import S3Location
from toolplane.signing import ALGORITHMS

__all__ = ["Settings"]

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
SANDBOX_LAYER = re.compile(r"^(rlimits|no_new_privs|seccomp|landlock[1-7]?)$")
AUTO_LAYERS = ("seccomp", "no_new_privs", "rlimits")  # + landlock6 without namespaces
DEPLOYMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
ROOT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class Settings(BaseSettings):
    """Every setting of both planes. Paths are made absolute at load."""

    model_config = SettingsConfigDict(env_prefix="TOOLPLANE_", extra="ignore", frozen=True)

    broker_url: str | None = Field(default=None, description="kombu broker URL; embedded if unset")
    database_url: str | None = Field(default=None, description="PostgreSQL URL; embedded if unset")
    runtime_database_url: str | None = Field(
        default=None,
        description="the control processes' PostgreSQL URL (a role the deployment made); "
        "if unset, migrate and up make <database>_runtime",
    )
    redis_url: str | None = Field(
        default=None, description="Redis for entitlements; defaults to a Redis broker's URL"
    )
    home: Path = Field(default=Path(".toolplane"), description="keys and embedded data")
    policy_dir: Path | None = Field(default=None, description="Cedar policy bundle directory")
    repo_root: Path = Field(default=Path("examples/repo"), description="read_repo_file's root")
    docs_root: Path = Field(default=Path("examples/docs"), description="search_docs' root")
    data_roots: Annotated[dict[str, Path], NoDecode] = Field(
        default_factory=dict,
        description='further named data roots, JSON: {"name": "/dir"} (repo and docs: above)',
    )
    token: SecretStr | None = Field(default=None, description="API token of the principal")
    extra_tools: str = Field(default="", description="comma-separated modules registering tools")
    flower_user: str = "admin"
    flower_password: SecretStr | None = None
    flower_port: int = Field(default=5555, ge=1, le=65535)
    receipt_algorithm: str = Field(default="ed25519", description="ed25519 or hmac-sha256")
    receipt_algorithms: str = Field(
        default="",
        description="per-tool receipt algorithms, TOOL=ALGORITHM comma-separated (others: "
        "receipt_algorithm)",
    )
    environment: str = Field(
        default="dev", description="the deployment's environment (a call may only be stricter)"
    )
    environments: str = Field(
        default="dev,staging,prod", description="environments, least strict first"
    )
    classification: str = Field(
        default="internal", description="the least classification any call's data has"
    )
    classifications: str = Field(
        default="public,internal,confidential,restricted",
        description="data classifications, least sensitive first",
    )
    workflows_dir: Path | None = Field(default=None, description="workflow YAML directory")
    log_format: Literal["text", "json"] = Field(
        default="text", description="every process's log lines: text, or JSON objects"
    )
    visibility_timeout: int = Field(
        default=30, ge=5, le=3600, description="s before a job held by a dead worker comes back"
    )
    queue_wait_s: int = Field(
        default=60, ge=5, le=3600, description="s a job may wait in its queue before it expires"
    )
    api_bind: str = Field(default="127.0.0.1:8765", description="host:port the API serves on")
    api_cert: Path | None = Field(default=None, description="the API's TLS certificate (PEM)")
    api_key: Path | None = Field(default=None, description="the API's TLS private key (PEM)")
    api_client_ca: Path | None = Field(
        default=None, description="CA whose client certificates the API requires (mutual TLS)"
    )
    api_max_connections: int = Field(
        default=1000, ge=10, le=100_000, description="open connections and event streams"
    )
    api_processes: int = Field(
        default=1,
        ge=0,
        le=64,
        description="API server processes `up` starts beside the control (they share the "
        "port); 0 serves the API from a thread of the control process",
    )
    api_max_body: int = Field(
        default=1_048_576, ge=1024, le=64 * 1_048_576, description="largest request body, bytes"
    )
    allow_weak_containment: bool = Field(
        default=False, description="run tools without namespaces where bwrap cannot"
    )
    sandbox_min_layers: str = Field(
        default="auto",
        description="kernel layers a worker requires in each tool call's process, "
        "comma-separated from landlock[N], seccomp, no_new_privs, rlimits; auto: "
        "seccomp,no_new_privs,rlimits, plus landlock6 where bubblewrap cannot run",
    )
    sandbox_warm_runners: int = Field(
        default=4, ge=1, le=64, description="warm sandbox runners per worker process (one a tenant)"
    )
    worker_user: str = Field(
        default="toolplane-{tool}",
        description="user of a tool's workers when `toolplane up` is root ({tool}: its name)",
    )
    worker_env: str = Field(
        default="", description="comma-separated names of further variables the workers get"
    )
    deployment: str = Field(
        default="toolplane.local",
        description="the deployment's name: the key name of its checkpoints and the first part "
        "of each chain's checkpoint origin (<deployment>/tenant/<id>)",
    )
    checkpoint_dir: Path | None = Field(
        default=None, description="signed checkpoints, outside the database; $HOME/checkpoints"
    )
    checkpoint_store: str | None = Field(
        default=None,
        description="s3://<bucket>[/<prefix>]: signed checkpoints in an S3-compatible bucket, "
        "not CHECKPOINT_DIR (boto3: the s3 extra)",
    )
    ingest_batch: int = Field(
        default=64,
        ge=1,
        le=1000,
        description="results the control ingests in one transaction at most (those already "
        "waiting; it holds as many unacknowledged)",
    )
    metrics: Literal["on", "off"] = Field(
        default="on",
        description="the control's metrics: on (counted at each commit, served at /metrics) "
        "or off (nothing counted; /metrics answers 404)",
    )
    metrics_tenant_labels: int = Field(
        default=50,
        ge=0,
        le=10_000,
        description="tenants a metric names by id, at most (the rest are summed as `other`)",
    )
    worker_metrics_bind: str | None = Field(
        default=None,
        description="host:port on which each sandbox worker serves its own metrics; unset: "
        "none (a second worker of a tool on one host needs another port)",
    )
    worker_metrics_token_file: Path | None = Field(
        default=None,
        description="a file holding the bearer token the worker's metrics endpoint asks for "
        "(unset: the endpoint asks for none; bind it to loopback or a private network)",
    )
    checkpoint_interval_s: float = Field(
        default=30.0, ge=0, le=86_400, description="s between the control's checkpoints; 0: never"
    )
    artifact_dir: Path | None = Field(
        default=None,
        description="the artifact store: large results, outside the database; $HOME/artifacts",
    )
    artifact_store: str | None = Field(
        default=None,
        description="s3://<bucket>[/<prefix>]: the artifact store in an S3-compatible bucket, "
        "not ARTIFACT_DIR (boto3: the s3 extra)",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="the S3-compatible endpoint; unset: AWS (or AWS_ENDPOINT_URL)"
    )
    s3_region: str | None = Field(default=None, description="the bucket's region; or AWS_REGION")
    s3_access_key_id: SecretStr | None = Field(
        default=None, description="S3 access key id; unset: boto3's chain (AWS_* variables...)"
    )
    s3_secret_access_key: SecretStr | None = Field(default=None, description="its secret")
    s3_conditional_writes: bool = Field(
        default=True,
        description="put with If-None-Match: * (the server refuses to replace an object); "
        "false for a server without it: HEAD, then put (a race window)",
    )
    artifact_threshold: int = Field(
        default=65_536,
        ge=0,
        le=2**31,
        description="bytes of a result's canonical JSON above which it is kept in the artifact "
        "store, not inline in the database",
    )
    witness_urls: str = Field(
        default="", description="comma-separated URLs of witnesses that cosign checkpoints"
    )
    witness_keys: str = Field(
        default="", description="comma-separated verifier keys of those witnesses (pinned)"
    )
    broker_acl_dir: Path | None = Field(
        default=None, description="`toolplane broker-acl`'s files: a broker user per process"
    )

    @field_validator(
        "home",
        "repo_root",
        "docs_root",
        "policy_dir",
        "workflows_dir",
        "api_cert",
        "api_key",
        "api_client_ca",
        "broker_acl_dir",
        "checkpoint_dir",
        "artifact_dir",
    )
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser().resolve()

    @field_validator("checkpoint_store", "artifact_store")
    @classmethod
    def _s3_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return str(S3Location.parse(value.strip()))

    @field_validator("sandbox_min_layers")
    @classmethod
    def _layers(cls, value: str) -> str:
        names = [n.strip() for n in value.split(",") if n.strip()]
        if names == ["auto"]:
            return "auto"
        if not names:
            raise ValueError("must name at least one layer (rlimits), or be auto")
        for name in names:
            if not SANDBOX_LAYER.match(name):
                raise ValueError(
                    f"{name!r} is not a layer: use auto, or a comma-separated list of "
                    "landlock, landlock1 to landlock7 (that ABI or newer), seccomp, "
                    "no_new_privs, rlimits"
                )
        return ",".join(names)

    @field_validator("data_roots", mode="before")
    @classmethod
    def _roots_json(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except ValueError as e:
                raise ValueError(f"not JSON ({e})") from e
        if not isinstance(value, dict):
            raise ValueError('must be a JSON object of names to directories: {"name": "/dir"}')
        for name in value:
            if not isinstance(name, str) or not ROOT_NAME.match(name):
                raise ValueError(f"root name {str(name)[:40]!r} must match {ROOT_NAME.pattern}")
            if name in ("repo", "docs"):
                raise ValueError(f"{name!r} is set by TOOLPLANE_{name.upper()}_ROOT, not here")
        return value

    @field_validator("data_roots")
    @classmethod
    def _roots_absolute(cls, value: dict[str, Path]) -> dict[str, Path]:
        return {name: path.expanduser().resolve() for name, path in value.items()}

    @field_validator("deployment")
    @classmethod
    def _deployment(cls, value: str) -> str:
        if not DEPLOYMENT.match(value) or value.endswith("/") or "//" in value:
            raise ValueError(
                "letters, digits, '.', '_', '-' and '/' only, at most 200, no empty segment"
            )
        return value

    @field_validator("receipt_algorithm")
    @classmethod
    def _algorithm(cls, value: str) -> str:
        if value not in ALGORITHMS:
            raise ValueError(f"must be one of {', '.join(ALGORITHMS)}")
        return value

    @field_validator("receipt_algorithms")
    @classmethod
    def _per_tool_algorithms(cls, value: str) -> str:
        seen: set[str] = set()
        for item in (i.strip() for i in value.split(",") if i.strip()):
            tool, sep, algorithm = (part.strip() for part in item.partition("="))
            if not sep or not tool:
                raise ValueError(f"{item!r}: expected TOOL=ALGORITHM")
            if tool in seen:
                raise ValueError(f"{tool!r} is named twice")
            if algorithm not in ALGORITHMS:
                raise ValueError(f"{tool}: {algorithm!r} must be one of {', '.join(ALGORITHMS)}")
            seen.add(tool)
        return value

    @model_validator(mode="after")
    def _one_store_each(self) -> Settings:
        for name in ("checkpoint", "artifact"):
            if getattr(self, f"{name}_dir") is not None and getattr(self, f"{name}_store"):
                raise ValueError(
                    f"TOOLPLANE_{name.upper()}_DIR and TOOLPLANE_{name.upper()}_STORE are both "
                    "set: a store is a directory or a bucket, set one"
                )
        return self

    @model_validator(mode="after")
    def _fits_an_envelope(self) -> Settings:
        """An envelope lives the queue wait + the visibility timeout + a tool's time limit,
        and never longer than MAX_ENVELOPE_LIFETIME_S: leave room for the tool."""
        if self.queue_wait_s + self.visibility_timeout >= MAX_ENVELOPE_LIFETIME_S:
            raise ValueError(
                f"queue_wait_s ({self.queue_wait_s}) + visibility_timeout "
                f"({self.visibility_timeout}) must stay below the envelope lifetime bound of "
                f"{MAX_ENVELOPE_LIFETIME_S} s, with room for the tools' time limits"
            )
        return self

    @property
    def environment_order(self) -> tuple[str, ...]:
        return tuple(e.strip() for e in self.environments.split(",") if e.strip())

    @property
    def classification_order(self) -> tuple[str, ...]:
        return tuple(c.strip() for c in self.classifications.split(",") if c.strip())

    @property
    def all_data_roots(self) -> dict[str, Path]:
        """Every named data root: repo, docs and those of TOOLPLANE_DATA_ROOTS."""
        return {"repo": self.repo_root, "docs": self.docs_root, **self.data_roots}

    def roots_for(self, names: tuple[str, ...]) -> dict[str, Path]:
        """The directories of the roots a tool declares (unknown names left out)."""
        known = self.all_data_roots
        return {name: known[name] for name in names if name in known}

    @staticmethod
    def root_setting(name: str) -> str:
        """The setting an operator uses to map the root ``name``."""
        if name in ("repo", "docs"):
            return f"TOOLPLANE_{name.upper()}_ROOT"
        return "TOOLPLANE_DATA_ROOTS"

    @property
    def extra_tool_modules(self) -> list[str]:
        return [name.strip() for name in self.extra_tools.split(",") if name.strip()]

    @property
    def worker_env_names(self) -> list[str]:
        return [name.strip() for name in self.worker_env.split(",") if name.strip()]

    def sandbox_layers_required(self, *, namespaces: bool) -> tuple[str, ...]:
        """The layers TOOLPLANE_SANDBOX_MIN_LAYERS requires of a worker, with or without
        bubblewrap's namespaces."""
        if self.sandbox_min_layers == "auto":
            return AUTO_LAYERS if namespaces else ("landlock6", *AUTO_LAYERS)
        return tuple(self.sandbox_min_layers.split(","))

    @property
    def tool_receipt_algorithms(self) -> dict[str, str]:
        """The tools TOOLPLANE_RECEIPT_ALGORITHMS names, each with its receipt algorithm."""
        pairs = (i.partition("=") for i in self.receipt_algorithms.split(",") if i.strip())
        return {tool.strip(): algorithm.strip() for tool, _, algorithm in pairs}

    def receipt_algorithm_for(self, tool: str) -> str:
        """The algorithm of ``tool``'s new receipt keys: its own, else RECEIPT_ALGORITHM."""
        return self.tool_receipt_algorithms.get(tool, self.receipt_algorithm)

    @property
    def keys_dir(self) -> Path:
        return self.home / "keys"

    @property
    def checkpoints_dir(self) -> Path:
        return self.checkpoint_dir if self.checkpoint_dir is not None else self.home / "checkpoints"

    @property
    def artifacts_dir(self) -> Path:
        return self.artifact_dir if self.artifact_dir is not None else self.home / "artifacts"

    def s3_env(self) -> dict[str, str]:
        """The S3 settings as the control's environment (with the secrets: the control's
        and the API's processes only, never a worker's)."""
        env = {}
        for name in ("checkpoint_store", "artifact_store", "s3_endpoint_url", "s3_region"):
            if getattr(self, name):
                env[f"TOOLPLANE_{name.upper()}"] = str(getattr(self, name))
        for name in ("s3_access_key_id", "s3_secret_access_key"):
            if (secret := getattr(self, name)) is not None:
                env[f"TOOLPLANE_{name.upper()}"] = secret.get_secret_value()
        env["TOOLPLANE_S3_CONDITIONAL_WRITES"] = str(self.s3_conditional_writes).lower()
        return env

    @property
    def bundle_dir(self) -> Path:
        if self.policy_dir is not None:
            return self.policy_dir
        return PACKAGE_ROOT / "policy" / "bundles" / "default"

    @property
    def workflow_dir(self) -> Path:
        return self.workflows_dir if self.workflows_dir is not None else PACKAGE_ROOT / "workflows"
