"""The environments of the stack's processes: what the control's and the API's processes
get, and the allowlist a worker's environment comes from."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from toolplane.errors import SettingsError
from toolplane.settings import Settings
from toolplane.tracing import WORKER_TRACE_SETTINGS

# What a worker keeps of the environment it starts from (LC_* too; TOOLPLANE_WORKER_ENV more)
WORKER_BASE_ENV = tuple("PATH LANG LANGUAGE TZ PYTHONPATH PYTHONDONTWRITEBYTECODE".split())
WORKER_BASE_ENV += ("PYTHONUNBUFFERED", "PYTHONIOENCODING", "PYTHONUTF8", *WORKER_TRACE_SETTINGS)
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

__all__ = ["ENV_NAME", "WORKER_BASE_ENV", "api_env", "worker_env"]


def api_env(settings: Settings) -> dict[str, str]:
    """The control's API settings (bind, TLS, limits) for its process."""
    env = {
        "TOOLPLANE_API_BIND": settings.api_bind,
        "TOOLPLANE_API_MAX_BODY": str(settings.api_max_body),
        "TOOLPLANE_API_MAX_CONNECTIONS": str(settings.api_max_connections),
        "TOOLPLANE_ENVIRONMENT": settings.environment,
        "TOOLPLANE_ENVIRONMENTS": settings.environments,
        "TOOLPLANE_CLASSIFICATION": settings.classification,
        "TOOLPLANE_CLASSIFICATIONS": settings.classifications,
    }
    for name in ("api_cert", "api_key", "api_client_ca"):
        value = getattr(settings, name)
        if value is not None:
            env[f"TOOLPLANE_{name.upper()}"] = str(value)
    return env


def _ledger_settings(settings: Settings) -> dict[str, str]:
    """The control's ingest batch, checkpoint, witness, receipt-kind and artifact settings."""
    names = "deployment checkpoint_dir checkpoint_interval_s witness_urls witness_keys".split()
    names += ["receipt_algorithms", "artifact_dir", "artifact_threshold", "ingest_batch"]
    names += ["metrics", "metrics_tenant_labels"]
    values = {name: getattr(settings, name) for name in names}
    return {f"TOOLPLANE_{k.upper()}": str(v) for k, v in values.items() if v is not None}


def _shared_settings(settings: Settings) -> dict[str, str]:
    """The settings the control and the workers must agree on: roots, tools, timings."""
    return {
        "TOOLPLANE_REPO_ROOT": str(settings.repo_root),
        "TOOLPLANE_DOCS_ROOT": str(settings.docs_root),
        "TOOLPLANE_DATA_ROOTS": json.dumps({k: str(v) for k, v in settings.data_roots.items()}),
        "TOOLPLANE_EXTRA_TOOLS": settings.extra_tools,
        "TOOLPLANE_RECEIPT_ALGORITHM": settings.receipt_algorithm,
        "TOOLPLANE_VISIBILITY_TIMEOUT": str(settings.visibility_timeout),
        "TOOLPLANE_QUEUE_WAIT_S": str(settings.queue_wait_s),
        "TOOLPLANE_LOG_FORMAT": settings.log_format,  # every child logs as the operator chose
    }


def worker_env(
    settings: Settings,
    *,
    tool: str,
    home: Path,
    broker_url: str,
    source: Mapping[str, str],
    metrics_offset: int = 0,
) -> dict[str, str]:
    """A worker's whole environment: of ``source``, only WORKER_BASE_ENV, ``LC_*`` and what
    TOOLPLANE_WORKER_ENV names; then its own settings (home, broker URL of its own user).

    With TOOLPLANE_WORKER_METRICS_BIND (host:port), the worker serves its metrics on
    port + ``metrics_offset`` (``toolplane up``: the tool's place in ``--workers``)."""
    extra = set(settings.worker_env_names)
    for name in extra:
        if not ENV_NAME.fullmatch(name) or name.startswith(("TOOLPLANE_", "CELERY_", "AWS_")):
            raise SettingsError(
                f"{name!r}: a variable name, not TOOLPLANE_*, CELERY_* or AWS_* (set for the "
                "worker here, its broker's, or the control's own cloud credentials)",
                setting="TOOLPLANE_WORKER_ENV",
            )
    env = {
        k: v for k, v in source.items() if k in WORKER_BASE_ENV or k.startswith("LC_") or k in extra
    }
    env.update(
        {
            **_shared_settings(settings),
            "HOME": str(home),
            "TOOLPLANE_HOME": str(home),
            "TOOLPLANE_BROKER_URL": broker_url,
            "TOOLPLANE_SANDBOX_WARM_RUNNERS": str(settings.sandbox_warm_runners),
        }
    )
    if settings.allow_weak_containment:
        env["TOOLPLANE_ALLOW_WEAK_CONTAINMENT"] = "true"
    if settings.sandbox_min_layers != "auto":  # the operator's floor of kernel layers
        env["TOOLPLANE_SANDBOX_MIN_LAYERS"] = settings.sandbox_min_layers
    if settings.worker_metrics_bind:  # the worker's own metrics endpoint: off unless set
        host, _, port = settings.worker_metrics_bind.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) + metrics_offset < 65536:
            raise SettingsError(
                f"{settings.worker_metrics_bind!r} is not host:port (a worker of each tool "
                "listens on the port plus the tool's place in --workers)",
                setting="TOOLPLANE_WORKER_METRICS_BIND",
            )
        env["TOOLPLANE_WORKER_METRICS_BIND"] = f"{host}:{int(port) + metrics_offset}"
        if settings.worker_metrics_token_file is not None:
            env["TOOLPLANE_WORKER_METRICS_TOKEN_FILE"] = str(settings.worker_metrics_token_file)
    return env
