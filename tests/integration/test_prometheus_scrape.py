"""A real Prometheus (Debian's package) scraping a real stack with docker/observability's
config and alert rules: the control's /metrics as an operator, a worker's endpoint with
its token, both up; without the credentials both are refused; the values it stores are
the stack's; every alert rule evaluates without error.

The config is the one compose mounts, with only what a compose network gives changed to
what this host has: the targets (127.0.0.1 instead of the services' names and DNS), plain
HTTP (the test stack's API has no TLS) and the secret files' paths; the scrape and rule
intervals are 1 s so the test does not wait 15.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.harness import (
    REPO,
    Services,
    Stack,
    free_port,
    wait_for,
)
from tests.integration.govern import operator_admin
from tests.integration.test_metrics import worker_metered, worker_token, worker_url
from tests.unit.test_observability import promtool

pytestmark = pytest.mark.integration

OBS = REPO / "docker" / "observability"
TOOL = "read_repo_file"


@pytest.fixture(scope="module")
def scraped(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack whose worker serves its metrics behind a token from a file."""
    home = Path(tmp_path_factory.mktemp("scraped"))
    with worker_metered(services, home, workers={TOOL: 1}, extra={}) as running:
        yield running


def local_config(stack: Stack, secrets_dir: Path) -> dict[str, Any]:
    """docker/observability/prometheus.yml with this host's targets and paths."""
    config = yaml.safe_load((OBS / "prometheus.yml").read_text())
    config["global"].update({"scrape_interval": "1s", "evaluation_interval": "1s"})
    config["rule_files"] = [str(OBS / name) for name in config["rule_files"]]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    control, worker = jobs["toolplane-control"], jobs["toolplane-worker"]
    control["scheme"] = "http"
    del control["tls_config"]
    control["static_configs"] = [{"targets": [stack.url.split("://", 1)[1]]}]
    del worker["dns_sd_configs"], worker["relabel_configs"]
    worker_target = worker_url(stack, 0).split("://", 1)[1].split("/", 1)[0]
    worker["static_configs"] = [{"targets": [worker_target]}]
    for job in (control, worker):
        name = Path(job["authorization"]["credentials_file"]).name
        job["authorization"]["credentials_file"] = str(secrets_dir / name)
    # the same two endpoints, asked without credentials: they must refuse
    for job in (control, worker):
        anonymous = {k: v for k, v in job.items() if k != "authorization"}
        anonymous["job_name"] = job["job_name"] + "-anonymous"
        config["scrape_configs"].append(anonymous)
    return config


@pytest.fixture(scope="module")
def prometheus(scraped: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prometheus scraping ``scraped``; yields its base URL."""
    promtool()  # skips (fails in CI) where Debian's prometheus package is missing
    binary = shutil.which("prometheus")
    assert binary, "promtool without prometheus"
    work = Path(tmp_path_factory.mktemp("prometheus"))
    secrets_dir = work / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "prometheus_token").write_text(operator_admin(scraped) + "\n")
    (secrets_dir / "worker_metrics_token").write_text(worker_token(scraped) + "\n")
    config = work / "prometheus.yml"
    config.write_text(yaml.safe_dump(local_config(scraped, secrets_dir)))
    port = free_port()
    with (work / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(  # noqa: S603 - a fixed argv of ours
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: ready(url, proc), timeout=60, what="prometheus ready")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ready(url: str, proc: subprocess.Popen[bytes]) -> bool:
    assert proc.poll() is None, "prometheus exited"
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def targets(url: str) -> dict[str, dict[str, Any]]:
    active = httpx.get(f"{url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
    return {t["labels"]["job"]: t for t in active}


def query(url: str, promql: str) -> list[dict[str, Any]]:
    body = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def scraped_once(url: str) -> dict[str, dict[str, Any]] | None:
    found = targets(url)
    return found if all(t["health"] != "unknown" for t in found.values()) else None


def test_prometheus_scrapes_both_endpoints_with_their_credentials_only(
    scraped: Stack, prometheus: str
) -> None:
    with scraped.http(scraped.tenant()) as client:
        run = client.call(TOOL, {"path": "README.md"}, wait=True, timeout=60)
    assert run.status == "completed"
    found = wait_for(lambda: scraped_once(prometheus), timeout=60, what="every target scraped")
    assert set(found) == {
        "toolplane-control",
        "toolplane-worker",
        "toolplane-control-anonymous",
        "toolplane-worker-anonymous",
    }
    for job in ("toolplane-control", "toolplane-worker"):
        up = wait_for(
            lambda job=job: targets(prometheus)[job]["health"] == "up" or None,
            timeout=30,
            what=f"{job} up ({targets(prometheus)[job].get('lastError')})",
        )
        assert up
    for job in ("toolplane-control-anonymous", "toolplane-worker-anonymous"):
        target = targets(prometheus)[job]
        assert target["health"] == "down", target
        assert "401" in target["lastError"], target["lastError"]


def test_what_prometheus_stores_is_what_the_stack_counted(scraped: Stack, prometheus: str) -> None:
    with scraped.http(scraped.tenant()) as client:
        for _ in range(2):
            assert client.call(TOOL, {"path": "README.md"}, wait=True, timeout=60).status == (
                "completed"
            )
    promql = f'sum(toolplane_decisions_total{{job="toolplane-control",tool="{TOOL}"}})'

    def decided() -> float | None:
        result = query(prometheus, promql)
        value = float(result[0]["value"][1]) if result else 0.0
        return value if value >= 3 else None  # this module's three calls, all allowed

    assert wait_for(decided, timeout=60, what="the decisions scraped") == 3
    ok_jobs = f'toolplane_worker_jobs_total{{outcome="ok",tool="{TOOL}"}}'

    def worked() -> float | None:
        result = query(prometheus, ok_jobs)
        value = float(result[0]["value"][1]) if result else 0.0
        return value if value >= 3 else None

    assert wait_for(worked, timeout=60, what="the worker's jobs scraped") == 3
    assert query(prometheus, 'toolplane_outbox_backlog{job="toolplane-control"}')


def test_every_alert_rule_evaluates(prometheus: str) -> None:
    def evaluated() -> list[dict[str, Any]] | None:
        groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=5).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        done = all(r.get("lastEvaluation", "0001")[:4] != "0001" for r in rules)
        return rules if rules and done else None

    rules = wait_for(evaluated, timeout=30, what="the rules evaluated")
    assert {r["name"] for r in rules} == {
        "ToolplaneReceiptsRefused",
        "ToolplaneIngestLag",
        "ToolplaneOutboxBacklog",
        "ToolplaneToolQueueGrowing",
        "ToolplaneWorkersGone",
    }
    for rule in rules:
        assert rule["health"] == "ok", rule
