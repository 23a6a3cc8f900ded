"""Fixtures shared by every suite: real services, one stack of real processes."""

from __future__ import annotations

from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.fixture_data import start_http_server
from tests.harness import (
    Services,
    Stack,
    start_services,
    start_stack,
    stop_stack,
)

# The longest suites (each starts stacks of its own or runs many calls through one):
# marked `long`, run by `make long` rather than `make test`, which keeps under 10 minutes.
# A bare `pytest` runs both.
LONG = frozenset(
    {
        "tests/integration/test_api_processes.py",
        "tests/integration/test_batched_ingest.py",
        "tests/integration/test_broker_acl.py",
        "tests/integration/test_db_roles.py",
        "tests/integration/test_entitlements.py",
        "tests/integration/test_governance.py",
        "tests/integration/test_receipt_kinds.py",
        "tests/integration/test_results_poison.py",
        "tests/integration/test_s3_stack.py",
        "tests/integration/test_s3_stores.py",
        "tests/integration/test_transparency.py",
        "tests/integration/test_up_down.py",
        "tests/security/test_artifact_attacks.py",
        "tests/security/test_key_revocation.py",
    }
)
ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.relative_to(ROOT).as_posix() in LONG:
            item.add_marker(pytest.mark.long)


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    found = start_services(tmp_path_factory.mktemp("services"))
    try:
        yield found
    finally:
        found.close()


@pytest.fixture(scope="session")
def http_server() -> Iterator[ThreadingHTTPServer]:
    """A loopback HTTP server: the one host the test tool `fetcher` may reach."""
    server = start_http_server()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def stack(
    services: Services, tmp_path_factory: pytest.TempPathFactory, http_server: ThreadingHTTPServer
) -> Iterator[Stack]:
    home = Path(tmp_path_factory.mktemp("home"))
    port = http_server.server_address[1]
    running = start_stack(  # the fetcher may name both; policy names only 127.0.0.1 as private
        services,
        home,
        egress=f"127.0.0.1:{port},localhost:{port}",
        private_egress=f"127.0.0.1:{port}",
    )
    try:
        yield running
    finally:
        stop_stack(running)


@pytest.fixture
def token(stack: Stack) -> str:
    """The admin token of a fresh tenant."""
    return stack.tenant()


@pytest.fixture(autouse=True)
def _release_clients(request: pytest.FixtureRequest) -> Iterator[None]:
    """Close the database pools of the clients a test made (the server has 100 slots)."""
    yield
    if "stack" not in request.fixturenames:
        return
    stack = request.getfixturevalue("stack")
    for client in stack.clients:
        client.plane.engine.dispose()
    stack.clients.clear()
