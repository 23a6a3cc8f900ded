"""One compose stack of real podman containers for the whole container suite."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.containers.stack import Stack, down, podman, prepare, up

# Names of containers, networks and volumes start with it; another checkout running the
# suite on the same host at the same time needs its own.
PROJECT = os.environ.get("TOOLPLANE_CONTAINERS_PROJECT", "tpct")
IMAGES = (
    "toolplane-control:0.1.0",
    "toolplane-worker:0.1.0",
    "toolplane-standin-redis:latest",
    "toolplane-standin-postgres:latest",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:  # the stack's start counts against the first test's timeout
        item.add_marker(pytest.mark.timeout(600))


@pytest.fixture(scope="session")
def cstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: run `make containers` (docker/images.sh installs it)")
    missing = [i for i in IMAGES if podman("image", "exists", i, check=False).returncode != 0]
    if missing:
        pytest.fail(f"images missing: {missing}: run `make containers`, which builds them")
    down(PROJECT)
    stack = prepare(Path(tmp_path_factory.mktemp("containers")), PROJECT)
    try:
        up(stack)
        yield stack
    finally:
        print("container figures", json.dumps(stack.timings, default=str))
        (stack.work / "figures.json").write_text(json.dumps(stack.timings, indent=2, default=str))
        down(PROJECT)
