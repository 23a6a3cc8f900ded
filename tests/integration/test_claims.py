"""Claims on real Redis: replay protection that keeps at-least-once delivery."""

from __future__ import annotations

import secrets
import time

import pytest

from sandbox_tasks.claims import ClaimState, RedisClaims
from tests.harness import Services

pytestmark = pytest.mark.integration


@pytest.fixture
def claims(services: Services) -> RedisClaims:
    return RedisClaims(services.redis(), prefix=f"test:{secrets.token_hex(4)}:")


def test_first_claim_runs_a_copy_under_a_live_lease_does_not(claims: RedisClaims) -> None:
    first = claims.acquire("run/a/1", lease_ms=5000)
    assert first.state is ClaimState.ACQUIRED
    second = claims.acquire("run/a/1", lease_ms=5000)
    assert second.state is ClaimState.RUNNING and 0 < second.ttl_ms <= 5000


def test_redelivery_after_a_crash_runs_once_the_lease_expires(claims: RedisClaims) -> None:
    assert claims.acquire("run/b/1", lease_ms=300).state is ClaimState.ACQUIRED
    # the worker dies: it never completes the claim
    time.sleep(0.4)
    assert claims.acquire("run/b/1", lease_ms=300).state is ClaimState.ACQUIRED


def test_a_finished_job_is_never_run_again(claims: RedisClaims) -> None:
    assert claims.acquire("run/c/1", lease_ms=5000).state is ClaimState.ACQUIRED
    claims.complete("run/c/1", keep_ms=60_000)
    assert claims.acquire("run/c/1", lease_ms=5000).state is ClaimState.DONE
    assert claims.acquire("run/c/2", lease_ms=5000).state is ClaimState.ACQUIRED  # a new attempt
