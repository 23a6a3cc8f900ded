"""Fault-test fixtures: stacks on dedicated Redis and PostgreSQL that tests may kill and restart."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import kombu.pools
import pytest

from tests.faults.servers import Dedicated, start_dedicated
from tests.harness import Stack, start_stack, stop_stack

# Short enough that a lost job is redelivered, or its node given up on, within a test's timeout.
FAULT_ENV = {"TOOLPLANE_VISIBILITY_TIMEOUT": "10", "TOOLPLANE_QUEUE_WAIT_S": "10"}

MakeFaultStack = Callable[..., Stack]


@pytest.fixture(scope="session")
def dedicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dedicated]:
    """Started once per session; every fault stack of the session runs on these servers."""
    servers = start_dedicated(tmp_path_factory.mktemp("dedicated"))
    try:
        yield servers
    finally:
        servers.close()


@pytest.fixture
def make_fault_stack(
    dedicated: Dedicated, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MakeFaultStack]:
    """``make_fault_stack(workers=..., extra_env=...)`` starts a stack; all are stopped after.

    Each starts on running servers and an empty broker: a previous test may have left a
    server down, or jobs of its stack (signed with that stack's keys) in the queues. A test
    that restarts Redis itself should know that in-process clients (kombu's pools, see below)
    meet one dead connection per pooled one before they reconnect.
    """
    stacks: list[Stack] = []

    def make(
        *, workers: dict[str, int] | None = None, extra_env: dict[str, str] | None = None
    ) -> Stack:
        dedicated.ensure_running()
        with dedicated.services.redis() as broker:
            broker.flushall()
        # kombu keeps process-wide connection pools per broker URL: after a Redis restart they
        # hold dead connections, and the new stack's readiness ping would borrow one.
        kombu.pools.reset()
        home = Path(tmp_path_factory.mktemp("fault-home"))
        stack = start_stack(
            dedicated.services, home, workers=workers, extra_env={**FAULT_ENV, **(extra_env or {})}
        )
        stacks.append(stack)
        return stack

    try:
        yield make
    finally:
        for stack in stacks:
            stop_stack(stack)


@pytest.fixture
def fault_stack(make_fault_stack: MakeFaultStack) -> Stack:
    """A stack with one worker per tool and the short fault-test timeouts."""
    return make_fault_stack()
