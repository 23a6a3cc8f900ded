"""Claims: replay protection that keeps at-least-once delivery.

One claim per job id (run/node/attempt) in Redis: ``running`` with a lease while
a worker runs it, ``done`` once its result is published. A redelivery after a
crash finds the lease expired and runs; a replay of a finished job, or a copy
of a job that runs under a live lease, does not.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from enum import StrEnum

import redis

__all__ = ["ClaimState", "Claim", "RedisClaims"]


class ClaimState(StrEnum):
    ACQUIRED = "acquired"
    """This worker holds the lease and runs the job."""
    RUNNING = "running"
    """Another worker holds a live lease on the job."""
    DONE = "done"
    """The job already ran and its result was published."""


@dataclass(frozen=True)
class Claim:
    state: ClaimState
    job_id: str
    token: str = ""
    ttl_ms: int = 0  # for RUNNING: how long the other lease still lives


class RedisClaims:
    def __init__(self, client: redis.Redis, *, prefix: str = "toolplane:claim:") -> None:
        self.client = client
        self.prefix = prefix

    def _key(self, job_id: str) -> str:
        return self.prefix + job_id

    def acquire(self, job_id: str, *, lease_ms: int) -> Claim:
        token = secrets.token_hex(8)
        key = self._key(job_id)
        if self.client.set(key, f"running:{token}", nx=True, px=lease_ms):
            return Claim(ClaimState.ACQUIRED, job_id, token)
        value = self.client.get(key)
        if value is None:  # expired in between: try once more
            if self.client.set(key, f"running:{token}", nx=True, px=lease_ms):
                return Claim(ClaimState.ACQUIRED, job_id, token)
            value = self.client.get(key) or b"running:"
        if value.startswith(b"done"):
            return Claim(ClaimState.DONE, job_id)
        return Claim(ClaimState.RUNNING, job_id, ttl_ms=max(int(self.client.pttl(key)), 0))

    def done(self, job_id: str) -> bool:
        """Whether the job ran and its result was published (a read; it claims nothing)."""
        value = self.client.get(self._key(job_id))
        return value is not None and value.startswith(b"done")

    def complete(self, job_id: str, *, keep_ms: int) -> None:
        """Mark the job done; kept until its envelope has expired (replays are then expired)."""
        self.client.set(self._key(job_id), "done", px=max(keep_ms, 1000))
