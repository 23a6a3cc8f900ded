"""Retry arithmetic: who is retried, how often, after how long, and when an attempt is late."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import BaseModel, ConfigDict

from control.orchestration.dispatch import DUE_GRACE_S, due_at_for, envelope_ttl_s
from control.orchestration.intake import max_attempts
from control.orchestration.orchestrator import RETRY_CAP_S, retry_delay_s
from sandbox_tasks.errors import RegistryError
from sandbox_tasks.registry import ToolSpec, load_tools


class Args(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


@pytest.mark.parametrize(
    ("manifest", "expected"),
    [
        ({}, 1),  # says nothing: not safe to run twice
        ({"read_only": False, "max_attempts": 5}, 1),
        ({"read_only": True}, 3),
        ({"read_only": True, "max_attempts": 5}, 5),
        ({"read_only": True, "max_attempts": 0}, 3),  # nonsense from a manifest: the default
        ({"read_only": True, "max_attempts": 1000}, 3),
        ({"read_only": "yes", "max_attempts": 5}, 1),
    ],
)
def test_only_read_only_tools_get_more_than_one_attempt(manifest: dict, expected: int) -> None:
    assert max_attempts(manifest) == expected


def test_backoff_doubles_with_jitter_up_to_a_cap() -> None:
    for attempt, base in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0)):
        delays = [retry_delay_s(attempt) for _ in range(200)]
        assert base * 0.8 <= min(delays) and max(delays) <= base * 1.2
        assert len(set(delays)) > 1  # jittered, so lost jobs do not come back in lockstep
    assert max(retry_delay_s(20) for _ in range(200)) <= RETRY_CAP_S * 1.2


def test_an_attempt_is_late_only_when_no_worker_can_still_run_it() -> None:
    ttl = envelope_ttl_s(visibility_timeout=30, tool_timeout_s=10, queue_wait_s=60)
    assert ttl == 100  # waits in the queue, then a redelivery, then the run itself
    expires = datetime(2026, 11, 28, tzinfo=UTC)
    # a worker may accept the job until it expires, then run it for up to its time limit
    assert due_at_for(expires, tool_timeout_s=10) == expires + timedelta(seconds=10 + DUE_GRACE_S)


def test_tools_declare_read_only_and_attempts() -> None:
    def spec(**kw: object) -> ToolSpec:
        return ToolSpec("t", "1", "", Args, Args, lambda a, c: a, **kw)  # type: ignore[arg-type]

    assert spec().manifest()["read_only"] is False
    assert spec().manifest()["max_attempts"] == 1
    assert spec(read_only=True, max_attempts=4).manifest()["max_attempts"] == 4
    with pytest.raises(RegistryError, match="max_attempts must be 1 to 10"):
        spec(read_only=True, max_attempts=0)
    builtins = load_tools()
    assert {n: s.read_only for n, s in builtins.items()} == {
        "lint_python": True,
        "read_repo_file": True,
        "search_docs": True,
    }
