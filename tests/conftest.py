"""Fixtures shared by every suite: real services, one stack of real processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Services, Stack, start_services, start_stack, stop_stack


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    found = start_services(tmp_path_factory.mktemp("services"))
    try:
        yield found
    finally:
        found.close()


@pytest.fixture(scope="session")
def stack(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = Path(tmp_path_factory.mktemp("home"))
    running = start_stack(services, home)
    try:
        yield running
    finally:
        stop_stack(running)


@pytest.fixture
def token(stack: Stack) -> str:
    """The admin token of a fresh tenant."""
    return stack.tenant()
