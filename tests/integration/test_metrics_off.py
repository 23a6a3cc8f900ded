"""``TOOLPLANE_METRICS=off`` on a real stack: calls complete, nothing is counted (the
metrics directory stays empty), and ``GET /metrics`` answers an operator's admin 404
naming the setting while everyone else gets the same 401 or 403 as when metrics are on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from control.ops.metrics import metrics_dir
from tests.harness import Services, Stack, own_stack
from tests.integration.govern import operator_admin

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def unmetered(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = Path(tmp_path_factory.mktemp("unmetered"))
    with own_stack(
        services,
        home,
        workers={"read_repo_file": 1},
        extra_env={"TOOLPLANE_METRICS": "off", "TOOLPLANE_API_PROCESSES": "1"},
    ) as running:
        yield running


def get_metrics(stack: Stack, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(stack.url + "/metrics", headers=headers, timeout=30)


def test_calls_complete_and_nothing_is_counted(unmetered: Stack) -> None:
    http = unmetered.http(unmetered.tenant())
    run = http.call("read_repo_file", {"path": "README.md"}, wait=True, timeout=60)
    assert run.status == "completed"
    counted = metrics_dir(unmetered.home)
    assert counted.is_dir()  # the supervisor made it, as always
    assert sorted(p.name for p in counted.iterdir()) == []  # no process wrote a count


def test_an_operator_admin_gets_404_naming_the_setting(unmetered: Stack) -> None:
    response = get_metrics(unmetered, operator_admin(unmetered))
    assert response.status_code == 404, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "TOOLPLANE_METRICS=off" in response.json()["detail"]


def test_others_are_refused_as_when_metrics_are_on(unmetered: Stack) -> None:
    assert get_metrics(unmetered, None).status_code == 401
    assert get_metrics(unmetered, unmetered.tenant()).status_code == 403
