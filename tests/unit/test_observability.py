"""docker/observability: Prometheus' config and alert rules (checked and unit-tested by
promtool, with synthetic series that fire and do not fire each alert), the Grafana
dashboard (a panel for every metric of the catalog, toolplane.metric_names, and no name
outside it), and the compose profile that runs them (the default services unchanged).

promtool comes from Debian's `prometheus` package (`make test` installs it as root);
without it these tests skip, except in CI, where they fail."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from toolplane.metric_names import METRICS

ROOT = Path(__file__).resolve().parents[2]
OBS = ROOT / "docker" / "observability"
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
DASHBOARD = json.loads((OBS / "grafana" / "dashboards" / "toolplane.json").read_text())
ALERTS = yaml.safe_load((OBS / "alerts.yml").read_text())
PROMETHEUS = yaml.safe_load((OBS / "prometheus.yml").read_text())
DEFAULT_SERVICES = {"redis", "postgres", "migrate", "control", "flower"}
ALERT_NAMES = {
    "ToolplaneReceiptsRefused",
    "ToolplaneIngestLag",
    "ToolplaneOutboxBacklog",
    "ToolplaneToolQueueGrowing",
    "ToolplaneWorkersGone",
}
NAME = re.compile(r"\b(toolplane_[a-z0-9_]+)")
HISTOGRAM_PARTS = ("_bucket", "_sum", "_count")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(
                "promtool is missing (Debian's package `prometheus`; make test installs it)"
            )
        pytest.skip("promtool is missing (apt-get install prometheus)")
    return found


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *map(str, args)], capture_output=True, text=True, timeout=60, cwd=cwd
    )


def test_promtool_checks_the_config(tmp_path: Path) -> None:
    """The config as compose mounts it: beside alerts.yml, with its secret files."""
    for name in ("prometheus.yml", "alerts.yml"):
        shutil.copy(OBS / name, tmp_path / name)
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "prometheus_token").write_text("tp_x\n")
    (tmp_path / "secrets" / "api_tls_cert").write_text("")
    (tmp_path / "secrets" / "worker_metrics_token").write_text("x" * 32 + "\n")
    done = run("check", "config", tmp_path / "prometheus.yml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    (tmp_path / "secrets" / "prometheus_token").unlink()  # the check can fail
    assert run("check", "config", tmp_path / "prometheus.yml", cwd=tmp_path).returncode != 0


def test_promtool_checks_the_rules() -> None:
    done = run("check", "rules", "alerts.yml", cwd=OBS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5 rules found" in done.stdout


def test_each_alert_fires_and_does_not_fire_on_synthetic_series() -> None:
    done = run("test", "rules", "alerts.test.yml", cwd=OBS)
    assert done.returncode == 0, done.stdout + done.stderr
    tests = yaml.safe_load((OBS / "alerts.test.yml").read_text())["tests"]
    cases = [c for t in tests for c in t["alert_rule_test"]]
    fired = {c["alertname"] for c in cases if c["exp_alerts"]}
    quiet = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert fired == quiet == ALERT_NAMES


def test_a_wrong_expectation_fails_the_rules_test(tmp_path: Path) -> None:
    shutil.copy(OBS / "alerts.yml", tmp_path / "alerts.yml")
    text = (OBS / "alerts.test.yml").read_text().replace("eval_time: 3m", "eval_time: 9m", 1)
    (tmp_path / "alerts.test.yml").write_text(text)
    assert run("test", "rules", "alerts.test.yml", cwd=tmp_path).returncode != 0


def test_the_alert_rules_are_the_five_named() -> None:
    rules = [r for g in ALERTS["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} == ALERT_NAMES
    assert all(r["labels"]["severity"] in {"warning", "critical"} for r in rules)


def names_in(exprs: list[str]) -> set[str]:
    found = set()
    for expr in exprs:
        for name in NAME.findall(expr):
            for part in HISTOGRAM_PARTS:
                if name.endswith(part) and METRICS.get(name.removesuffix(part), ("",))[0] == (
                    "histogram"
                ):
                    name = name.removesuffix(part)
            found.add(name)
    return found


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in DASHBOARD["panels"] for t in p["targets"]]
    return exprs + [v["definition"] for v in DASHBOARD["templating"]["list"]]


def test_the_dashboard_and_alerts_name_only_metrics_of_the_catalog() -> None:
    alert_exprs = [r["expr"] for g in ALERTS["groups"] for r in g["rules"]]
    used = names_in(dashboard_exprs()) | names_in(alert_exprs)
    assert used - set(METRICS) == set()
    assert "toolplane_not_a_metric" in names_in(["rate(toolplane_not_a_metric[5m])"])


def test_the_dashboard_has_a_panel_for_every_metric() -> None:
    assert set(METRICS) - names_in(dashboard_exprs()) == set()
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    uid = {t["datasource"]["uid"] for p in DASHBOARD["panels"] for t in p["targets"]}
    source = yaml.safe_load(
        (OBS / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert uid == {source["datasources"][0]["uid"]}


def test_prometheus_scrapes_the_control_as_an_operator_and_the_workers() -> None:
    jobs = {j["job_name"]: j for j in PROMETHEUS["scrape_configs"]}
    assert set(jobs) == {"toolplane-control", "toolplane-worker"}
    control = jobs["toolplane-control"]
    assert control["scheme"] == "https" and control["authorization"]["type"] == "Bearer"
    assert "credentials" not in control["authorization"]  # from a file, never inline
    targets = {
        s["target"].rsplit("/", 1)[-1]
        for s in COMPOSE["services"]["prometheus"]["secrets"]
        if isinstance(s, dict)
    }
    assert Path(control["authorization"]["credentials_file"]).name in targets
    workers = {n for n in COMPOSE["services"] if n.startswith("worker-")}
    assert set(jobs["toolplane-worker"]["dns_sd_configs"][0]["names"]) == workers
    # the workers' endpoints ask a token (reachable from the sandbox network too)
    worker_auth = jobs["toolplane-worker"]["authorization"]
    assert "credentials" not in worker_auth
    assert Path(worker_auth["credentials_file"]).name in targets


def test_the_compose_default_services_are_unchanged_without_the_profile() -> None:
    services = COMPOSE["services"]
    default = {n for n, s in services.items() if not s.get("profiles")}
    workers = {n for n in services if n.startswith("worker-")}
    assert default == DEFAULT_SERVICES | workers
    optional = {n: s["profiles"] for n, s in services.items() if s.get("profiles")}
    assert optional == {"prometheus": ["observability"], "grafana": ["observability"]}
    for name in default:  # nothing of the default set waits for or shares a network with them
        s = services[name]
        assert not set(s.get("depends_on", [])) & set(optional), name
        nets = s.get("networks", [])
        assert "metrics" not in nets, name
    assert COMPOSE["networks"]["metrics"]["internal"] is True
    assert "sandbox" not in services["prometheus"]["networks"]
    for name in optional:
        assert all(str(p).startswith("127.0.0.1:") for p in services[name]["ports"])


def test_the_workers_override_puts_exactly_the_workers_on_the_metrics_network() -> None:
    override = yaml.safe_load((OBS / "compose.workers.yaml").read_text())["services"]
    workers = {n for n in COMPOSE["services"] if n.startswith("worker-")}
    assert set(override) == workers
    for name, service in override.items():
        assert service["networks"] == [*COMPOSE["services"][name]["networks"], "metrics"]
        env = service["environment"]  # on, at the port Prometheus scrapes, behind the token
        assert env["TOOLPLANE_WORKER_METRICS_BIND"] == "0.0.0.0:9808"
        assert env["TOOLPLANE_WORKER_METRICS_TOKEN_FILE"] == "/run/secrets/worker_metrics_token"
        assert service["secrets"] == ["worker_metrics_token"]
    assert "worker_metrics_token" in COMPOSE["secrets"]
