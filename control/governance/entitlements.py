"""Entitlements enforced cluster-wide in Redis: rate, daily quota, tool-time budget,
calls per run, and jobs in flight per tool.

Every check and every increment of one reservation run in one Lua script, so
concurrent submitters in any number of processes never go one call over a
limit. Time comes from Redis (``TIME``), not from the submitters' clocks.

A reservation is made at dispatch and settled from the receipt: the tool-time
budget is charged the tool's verified duration (nothing when it failed), and
the job leaves the in-flight set. Settling is idempotent per job id (a
redelivered result settles nothing twice). A reservation whose transaction did
not commit is cancelled; one that a crash left behind stays charged (errs
towards refusing, never towards exceeding), and its in-flight entry lapses
after the envelope's lifetime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import redis

from control.errors import ServiceUnavailable
from policy.entitlements import Plan

__all__ = ["EntitlementStore", "Exceeded", "UNLIMITED"]

UNLIMITED = -1
DAY_TTL_S = 3 * 86400
RUN_TTL_S = 30 * 86400

# KEYS: none (single Redis; key names are built from ARGV[1], the tenant prefix).
# ARGV: prefix, job_id, tool, run_id, reserve_ms, stale_ms,
#       rate_calls, rate_window_ms, daily_calls, budget_ms, run_max, queue_cap,
#       day_ttl_s, run_ttl_s
_RESERVE = """
local p, job, tool, run = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local reserve, stale = tonumber(ARGV[5]), tonumber(ARGV[6])
local rate_calls, rate_window = tonumber(ARGV[7]), tonumber(ARGV[8])
local daily_calls, budget, run_max, queue_cap =
  tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local day = tostring(math.floor(tonumber(t[1]) / 86400))
local k_rate, k_calls, k_budget = p .. ':rate', p .. ':calls:' .. day, p .. ':budget:' .. day
local k_run, k_queue, k_resv = p .. ':run:' .. run, p .. ':queued:' .. tool, p .. ':resv'
if redis.call('HEXISTS', k_resv, job) == 1 then return {1, 'already reserved', 0, 0} end
if rate_calls >= 0 then
  redis.call('ZREMRANGEBYSCORE', k_rate, '-inf', now - rate_window)
  local n = redis.call('ZCARD', k_rate)
  if n >= rate_calls then return {0, 'rate', n, rate_calls} end
end
local calls = tonumber(redis.call('GET', k_calls) or '0')
if daily_calls >= 0 and calls >= daily_calls then return {0, 'daily_calls', calls, daily_calls} end
local used = tonumber(redis.call('GET', k_budget) or '0')
if budget >= 0 and used + reserve > budget then
  return {0, 'daily_tool_seconds', used, budget}
end
local in_run = tonumber(redis.call('GET', k_run) or '0')
if run_max >= 0 and in_run >= run_max then return {0, 'run_max_calls', in_run, run_max} end
if queue_cap >= 0 then
  redis.call('ZREMRANGEBYSCORE', k_queue, '-inf', now - stale)
  local q = redis.call('ZCARD', k_queue)
  if q >= queue_cap then return {0, 'queued_per_tool', q, queue_cap} end
end
if rate_calls >= 0 then
  redis.call('ZADD', k_rate, now, job)
  redis.call('PEXPIRE', k_rate, rate_window + 1000)
end
redis.call('INCR', k_calls); redis.call('EXPIRE', k_calls, tonumber(ARGV[13]))
redis.call('INCRBY', k_budget, reserve); redis.call('EXPIRE', k_budget, tonumber(ARGV[13]))
redis.call('INCR', k_run); redis.call('EXPIRE', k_run, tonumber(ARGV[14]))
redis.call('ZADD', k_queue, now, job)
redis.call('HSET', k_resv, job, day .. '|' .. reserve .. '|' .. tool .. '|' .. run)
return {1, 'ok', 0, 0}
"""

# ARGV: prefix, job_id, mode ('settle' or 'cancel'), charged_ms (settle only), day_ttl_s
# A counter of a day that has expired is not brought back (it would have no expiry).
_SETTLE = """
local p, job, mode, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[5])
local function add(key, n)
  if n ~= 0 and redis.call('EXISTS', key) == 1 then
    local left = redis.call('TTL', key)
    redis.call('INCRBY', key, n)
    if left < 0 then redis.call('EXPIRE', key, ttl) end
  end
end
local k_resv = p .. ':resv'
local record = redis.call('HGET', k_resv, job)
if not record then return 0 end
redis.call('HDEL', k_resv, job)
local day, reserve, tool, run = string.match(record, '^([^|]*)|([^|]*)|([^|]*)|(.*)$')
local k_budget = p .. ':budget:' .. day
local charged = 0
if mode == 'settle' then
  if ARGV[4] == 'reserved' then charged = tonumber(reserve) else charged = tonumber(ARGV[4]) end
end
add(k_budget, charged - tonumber(reserve))
redis.call('ZREM', p .. ':queued:' .. tool, job)
if mode == 'cancel' then
  redis.call('ZREM', p .. ':rate', job)
  add(p .. ':calls:' .. day, -1)
  add(p .. ':run:' .. run, -1)
end
return 1
"""

MESSAGES = {
    "rate": "rate limit of {max} calls per {window} reached ({current} in the window)",
    "daily_calls": "daily quota of {max} calls reached ({current} today)",
    "daily_tool_seconds": (
        "daily budget of {max_s:g} tool-seconds would be exceeded "
        "({current_s:g} s used or reserved, this call reserves {reserve_s:g} s)"
    ),
    "run_max_calls": "at most {max} calls per run ({current} made)",
    "queued_per_tool": "at most {max} jobs in flight for {tool} ({current} now)",
}


@dataclass(frozen=True)
class Exceeded:
    """Which limit refused a call, and where it stood."""

    limit: str
    current: int | float
    maximum: int | float
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "limit": self.limit,
            "current": self.current,
            "max": self.maximum,
            "message": self.message,
        }


class EntitlementStore:
    def __init__(self, client: redis.Redis, *, prefix: str = "tp:ent") -> None:
        self.client = client
        self.prefix = prefix
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)

    @classmethod
    def from_url(cls, url: str) -> EntitlementStore:
        return cls(redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5))

    def _tenant(self, tenant_id: str) -> str:
        return f"{self.prefix}:{tenant_id}"

    def reserve(
        self,
        *,
        tenant_id: str,
        plan: Plan,
        tool: str,
        job_id: str,
        run_id: str,
        reserve_ms: int,
        stale_s: int,
    ) -> Exceeded | None:
        """Reserve one call under ``plan``; returns what was exceeded, or None when reserved."""

        def limit(value: int | None) -> int:
            return UNLIMITED if value is None else value

        budget = plan.daily_tool_seconds
        argv = [
            self._tenant(tenant_id),
            job_id,
            tool,
            run_id,
            reserve_ms,
            stale_s * 1000,
            limit(plan.rate.calls if plan.rate else None),
            plan.rate.per_s * 1000 if plan.rate else 0,
            limit(plan.daily_calls),
            UNLIMITED if budget is None else budget * 1000,
            limit(plan.run_max_calls),
            limit(plan.queued_per_tool),
            DAY_TTL_S,
            RUN_TTL_S,
        ]
        try:
            ok, name, current, maximum = self._reserve(args=argv)
        except redis.RedisError as e:
            raise ServiceUnavailable("entitlement store (Redis)", str(e)) from e
        if ok:
            return None
        name = name.decode() if isinstance(name, bytes) else name
        if name == "daily_tool_seconds":
            message = MESSAGES[name].format(
                max_s=maximum / 1000, current_s=current / 1000, reserve_s=reserve_ms / 1000
            )
            return Exceeded(name, current / 1000, maximum / 1000, message)
        window = f"{plan.rate.per_s} s" if plan.rate else ""
        message = MESSAGES[name].format(max=maximum, current=current, window=window, tool=tool)
        return Exceeded(name, current, maximum, message)

    def settle(self, *, tenant_id: str, job_id: str, charged_ms: int | None) -> bool:
        """Charge the verified tool time (None: the whole reservation) and end the job's
        reservation; once per job, so a redelivered result settles nothing twice."""
        charged = "reserved" if charged_ms is None else max(0, charged_ms)
        args = [self._tenant(tenant_id), job_id, "settle", charged, DAY_TTL_S]
        return bool(self._settle(args=args))

    def cancel(self, *, tenant_id: str, job_id: str) -> bool:
        """Undo a reservation whose dispatch did not commit."""
        return bool(self._settle(args=[self._tenant(tenant_id), job_id, "cancel", 0, DAY_TTL_S]))

    def usage(self, tenant_id: str) -> dict[str, Any]:
        """Where the tenant stands today: calls, tool-seconds used or reserved, reservations."""
        p = self._tenant(tenant_id)
        seconds, _ = self.client.time()
        day = seconds // 86400
        calls = int(self.client.get(f"{p}:calls:{day}") or 0)
        budget_ms = int(self.client.get(f"{p}:budget:{day}") or 0)
        return {
            "daily_calls": calls,
            "tool_seconds": budget_ms / 1000,
            "reservations": int(self.client.hlen(f"{p}:resv")),
        }


def reserve_ms_for(timeout_s: float) -> int:
    """A call reserves its tool's whole time limit until its receipt says what it used."""
    return max(1, math.ceil(timeout_s * 1000))
