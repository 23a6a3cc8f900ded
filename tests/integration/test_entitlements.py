"""Entitlements on real Redis: exact under concurrency, settled from receipts."""

from __future__ import annotations

import json
import multiprocessing
import secrets
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from control.errors import ServiceUnavailable
from control.governance.entitlements import EntitlementStore
from control.ops.runtime import POLICY_CHECK_S
from policy.entitlements import Plan
from tests.harness import Services, Stack, wait_for
from tests.integration.govern import bundle_with, client_on, evidence, outbox_rows

pytestmark = pytest.mark.integration

PROCESSES = 4
EACH = 15


@pytest.fixture
def prefix(services: Services):
    name = f"tp:test:{secrets.token_hex(4)}"
    yield name
    client = redis.Redis.from_url(services.redis_url)
    for key in client.scan_iter(f"{name}*"):
        client.delete(key)


def _reserve_many(url: str, prefix: str, plan: dict, same_run: bool, start: Any, n: int) -> int:
    store = EntitlementStore(redis.Redis.from_url(url), prefix=prefix)
    parsed = Plan.model_validate(plan)
    start.wait()
    won = 0
    for _ in range(n):
        job = secrets.token_hex(8)
        exceeded = store.reserve(
            tenant_id="tn_x",
            plan=parsed,
            tool="search_docs",
            job_id=job,
            run_id="run_shared" if same_run else f"run_{job}",
            reserve_ms=3000,
            stale_s=600,
        )
        won += exceeded is None
    return won


@pytest.mark.parametrize(
    ("plan", "same_run", "allowed"),
    [
        ({"rate": {"calls": 10, "per_s": 60}}, False, 10),
        ({"daily_calls": 7}, False, 7),
        ({"daily_tool_seconds": 10}, False, 3),  # 3 s reserved per call: 3 fit in 10 s
        ({"queued_per_tool": 5}, False, 5),
        ({"run_max_calls": 4}, True, 4),
    ],
    ids=["rate", "daily_calls", "budget", "queued_per_tool", "run_max_calls"],
)
def test_limits_hold_exactly_across_processes(services, prefix, plan, same_run, allowed):
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Manager().Event()
    with ctx.Pool(PROCESSES) as pool:
        pending = [
            pool.apply_async(
                _reserve_many, (services.redis_url, prefix, plan, same_run, start, EACH)
            )
            for _ in range(PROCESSES)
        ]
        time.sleep(0.5)
        start.set()
        won = sum(p.get(timeout=60) for p in pending)
    assert won == allowed  # of 60 attempts at once: never one over, never one short


def test_settling_charges_the_receipt_and_refunds_failures(services, prefix):
    store = EntitlementStore(redis.Redis.from_url(services.redis_url), prefix=prefix)

    def reserve(job: str, plan: Plan, tenant: str = "tn_y"):
        return store.reserve(
            tenant_id=tenant,
            plan=plan,
            tool="t",
            job_id=job,
            run_id=job,
            reserve_ms=4000,
            stale_s=600,
        )

    budget = Plan(daily_tool_seconds=10)
    assert reserve("a", budget) is None and reserve("b", budget) is None  # 8 s reserved
    refused = reserve("c", budget)
    assert (refused.limit, refused.current, refused.maximum) == ("daily_tool_seconds", 8, 10)
    assert "daily budget of 10 tool-seconds would be exceeded" in refused.message
    assert store.settle(tenant_id="tn_y", job_id="a", charged_ms=1250)  # what the receipt says
    assert not store.settle(tenant_id="tn_y", job_id="a", charged_ms=1250)  # once per job
    assert store.settle(tenant_id="tn_y", job_id="b", charged_ms=0)  # failed: refunded
    assert store.usage("tn_y")["tool_seconds"] == 1.25
    assert reserve("d", budget) is None
    store.settle(tenant_id="tn_y", job_id="d", charged_ms=None)  # invalid receipt: all of it
    assert store.usage("tn_y")["tool_seconds"] == 5.25
    assert reserve("e", budget) is None  # 9.25 s
    assert reserve("f", budget).limit == "daily_tool_seconds"
    assert store.cancel(tenant_id="tn_y", job_id="e")  # its dispatch did not commit
    assert store.usage("tn_y") == {"daily_calls": 3, "tool_seconds": 5.25, "reservations": 0}

    cap = Plan(queued_per_tool=2)
    assert reserve("q1", cap, "tn_q") is None and reserve("q2", cap, "tn_q") is None
    full = reserve("q3", cap, "tn_q")
    assert (full.limit, full.current, full.maximum) == ("queued_per_tool", 2, 2)
    store.settle(tenant_id="tn_q", job_id="q1", charged_ms=10)
    assert reserve("q3", cap, "tn_q") is None

    # A reservation settled after its day's counters expired does not bring them back
    # (they would never expire again).
    assert reserve("old", Plan(daily_calls=5), "tn_old") is None
    client = store.client
    day_keys = [
        k for k in client.scan_iter(f"{prefix}:tn_old:*") if b":calls:" in k or b":budget:" in k
    ]
    assert len(day_keys) == 2 and all(client.ttl(k) > 0 for k in day_keys)
    client.delete(*day_keys)
    assert store.cancel(tenant_id="tn_old", job_id="old")
    assert not any(client.exists(k) for k in day_keys)
    assert all(client.ttl(k) > 0 for k in client.scan_iter(f"{prefix}:tn_old:*"))


def test_a_reservation_left_by_a_crash_lapses_from_the_queue_cap(services, prefix):
    store = EntitlementStore(redis.Redis.from_url(services.redis_url), prefix=prefix)
    plan = Plan(queued_per_tool=1)
    kw = dict(tenant_id="tn_z", plan=plan, tool="t", reserve_ms=10, stale_s=1)
    assert store.reserve(job_id="lost", run_id="r1", **kw) is None  # never settled
    assert store.reserve(job_id="next", run_id="r2", **kw).limit == "queued_per_tool"
    time.sleep(1.1)
    assert store.reserve(job_id="next", run_id="r2", **kw) is None


def plan_bundle(stack: Stack, token: str, tmp_path, name: str, plan: dict) -> Any:
    """A copy of the stack's bundle that puts the token's tenant on ``plan``."""
    tenant = stack.client(token).identity.tenant_name
    return bundle_with(
        stack, tmp_path, entitlements={"plans": {name: plan}, "tenants": {tenant: name}}
    )


# -- through intake, from several processes -----------------------------------------------


def _submit_many(settings: dict, start: Any, n: int) -> list[str]:
    from control.orchestration.operations import Operations as Client
    from toolplane.settings import Settings

    client = Client.from_env(Settings(**settings))
    client.identity  # noqa: B018 - authenticate before the start line
    start.wait()
    return [client.submit("search_docs", {"query": f"q{i}"}) for i in range(n)]


def test_concurrent_submissions_never_exceed_the_rate_limit(stack: Stack, token, tmp_path):
    admin = stack.client(token)
    name = admin.identity.tenant_name
    bundle = bundle_with(
        stack,
        tmp_path,
        entitlements={
            "plans": {"tight": {"rate": {"calls": 6, "per_s": 60}}},
            "tenants": {name: "tight"},
        },
    )
    settings = stack.settings(token).model_copy(update={"policy_dir": bundle})
    plain = {k: v for k, v in settings.model_dump().items() if v is not None}
    plain["token"] = token
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Manager().Event()
    with ctx.Pool(3) as pool:
        pending = [pool.apply_async(_submit_many, (plain, start, 6)) for _ in range(3)]
        time.sleep(1.0)
        start.set()
        run_ids = [r for p in pending for r in p.get(timeout=120)]
    client = client_on(stack, token, bundle)
    statuses = client.wait_all(run_ids, timeout=90)
    assert sorted(statuses.values()).count("completed") == 6
    assert sorted(statuses.values()).count("denied") == 12
    denied = [r for r, s in statuses.items() if s == "denied"]
    for run_id in denied[:3]:
        kinds = dict(evidence(client, run_id))
        assert kinds["EntitlementDenied"]["limit"] == "rate"
        assert kinds["EntitlementDenied"]["current"] == 6
        assert kinds["EntitlementDenied"]["max"] == 6
        assert kinds["EntitlementDenied"]["plan"] == "tight"
        assert outbox_rows(client, run_id) == 0
        node = client.run(run_id).nodes[0]
        assert node.error["code"] == "entitlement_exceeded"


def server_plan(stack: Stack, token: str, name: str, plan: dict) -> None:
    """Put the token's tenant on ``plan`` in the control's own bundle (the only one that
    decides), and wait until the API serves the new version."""
    tenant = stack.client(token).identity.tenant_name
    path = Path(stack.env["TOOLPLANE_POLICY_DIR"]) / "entitlements.json"
    current = json.loads(path.read_text()) if path.exists() else {}
    current.setdefault("plans", {})[name] = plan
    current.setdefault("tenants", {})[tenant] = name
    path.write_text(json.dumps(current))
    written = time.monotonic()
    client = stack.http(token)
    wait_for(lambda: (client.policy().plan or {}).get("name") == name, what="the new bundle")
    # With several API processes, the one that answered has the new bundle; each other one
    # looks at the directory again at its next request once POLICY_CHECK_S has passed since
    # its last look (before the write): after that, every process decides with the plan.
    wait_for(lambda: time.monotonic() - written > POLICY_CHECK_S, what="every process's look")


def test_a_refused_call_exits_3_and_names_the_limit(stack: Stack, token, tmp_path):
    server_plan(stack, token, f"one{secrets.token_hex(3)}", {"daily_calls": 1})
    env: dict[str, str] = {}
    first = stack.cli("call", "search_docs", "--arg", "query=a", "--wait", token=token, env=env)
    assert first.returncode == 0, first.stderr
    second = stack.cli("call", "search_docs", "--arg", "query=b", "--json", token=token, env=env)
    assert second.returncode == 3
    run = json.loads(second.stdout)
    assert run["status"] == "denied"
    assert run["nodes"][0]["error"] == {
        "code": "entitlement_exceeded",
        "message": "daily quota of 1 calls reached (1 today)",
    }
    text = stack.cli("call", "search_docs", "--arg", "query=c", token=token, env=env)
    assert text.returncode == 3
    assert "denied: daily quota of 1 calls reached (1 today)" in text.stderr


def test_budget_is_reserved_at_dispatch_and_settled_from_receipts(stack: Stack, token, tmp_path):
    bundle = plan_bundle(stack, token, tmp_path, "b", {"daily_tool_seconds": 20})
    client = client_on(stack, token, bundle)
    store = client.plane.entitlements
    tenant_id = client.identity.tenant_id
    # sleepy may run 8 s, so each call reserves 8 s: two fit in 20 s, a third does not.
    first = client.submit("sleepy", {"seconds": 1.0, "tag": "budget-1"})
    second = client.submit("sleepy", {"seconds": 1.0, "tag": "budget-2"})
    third = client.call("sleepy", {"seconds": 0, "tag": "budget-3"})
    assert third.status == "denied"
    assert third.nodes[0].error["code"] == "entitlement_exceeded"
    assert "daily budget of 20 tool-seconds" in third.nodes[0].error["message"]
    assert client.wait_all([first, second], timeout=60) == {first: "completed", second: "completed"}
    wait_for(lambda: store.usage(tenant_id)["reservations"] == 0, what="settled")
    used = store.usage(tenant_id)["tool_seconds"]
    durations = sum(client.run(r).nodes[0].receipt is not None for r in (first, second))
    assert durations == 2
    assert 2.0 <= used < 6.0, used  # charged what the receipts say, not what was reserved
    # A failed call is refunded.
    failed = client.call("probe", {"action": "no-such-action"}, wait=True, timeout=60)
    assert failed.status == "failed"
    wait_for(lambda: store.usage(tenant_id)["reservations"] == 0, what="refunded")
    assert store.usage(tenant_id)["tool_seconds"] == used
    assert (
        client.call("sleepy", {"seconds": 0, "tag": "budget-4"}, wait=True, timeout=60).status
        == "completed"
    )


def test_queue_cap_keeps_one_tenant_from_flooding_a_tool(stack: Stack, token, tmp_path):
    bundle = plan_bundle(stack, token, tmp_path, "q", {"queued_per_tool": 1})
    client = client_on(stack, token, bundle)
    busy = client.submit("sleepy", {"seconds": 1.5, "tag": "cap-1"})
    flood = client.call("sleepy", {"seconds": 0, "tag": "cap-2"})
    assert flood.status == "denied"
    assert flood.nodes[0].error["message"] == "at most 1 jobs in flight for sleepy (1 now)"
    assert client.call("search_docs", {"query": "x"}).status != "denied"  # another tool is fine
    other = stack.client(stack.tenant())  # another tenant is not held back
    assert other.call("sleepy", {"seconds": 0, "tag": "cap-other"}).status != "denied"
    assert client.wait(busy, timeout=60).status == "completed"
    wait_for(
        lambda: client.call("sleepy", {"seconds": 0, "tag": "cap-3"}).status != "denied",
        what="the slot freed by the receipt",
    )


def test_a_plan_without_redis_is_refused_clearly(stack: Stack, token, tmp_path):
    bundle = plan_bundle(stack, token, tmp_path, "p", {"daily_calls": 5})
    client = client_on(stack, token, bundle)
    client.plane.__dict__["entitlements"] = None  # as with a RabbitMQ broker and no REDIS_URL
    before = len(client.runs(limit=1000))
    with pytest.raises(ServiceUnavailable, match="set TOOLPLANE_REDIS_URL"):
        client.call("search_docs", {"query": "x"})
    assert len(client.runs(limit=1000)) == before  # nothing committed


def test_redis_down_fails_closed(stack: Stack, token, tmp_path):
    bundle = plan_bundle(stack, token, tmp_path, "p", {"daily_calls": 5})
    settings = stack.settings(token).model_copy(
        update={"policy_dir": bundle, "redis_url": "redis://127.0.0.1:1/0"}
    )
    from control.orchestration.operations import Operations as Client

    client = Client.from_env(settings)
    stack.clients.append(client)
    before = len(client.runs(limit=1000))
    with pytest.raises(ServiceUnavailable, match="entitlement store"):
        client.call("search_docs", {"query": "x"})
    assert len(client.runs(limit=1000)) == before


def test_a_call_cut_off_at_its_time_limit_is_charged(stack: Stack, token, tmp_path):
    bundle = plan_bundle(stack, token, tmp_path, "b", {"daily_tool_seconds": 100})
    client = client_on(stack, token, bundle)
    store = client.plane.entitlements
    tenant_id = client.identity.tenant_id
    # The test bundle lowers sleepy's limit to 1 s for confidential data.
    view = client.call(
        "sleepy",
        {"seconds": 5, "tag": "cut"},
        classification="confidential",
        wait=True,
        timeout=60,
    )
    assert view.nodes[0].error["code"] == "timeout"
    wait_for(lambda: store.usage(tenant_id)["reservations"] == 0, what="settled")
    assert 0.9 <= store.usage(tenant_id)["tool_seconds"] < 5


def test_a_dispatch_that_fails_before_commit_gives_its_reservation_back(
    stack: Stack, token, tmp_path, monkeypatch
):
    import control.orchestration.intake

    bundle = plan_bundle(stack, token, tmp_path, "p", {"daily_calls": 5})
    client = client_on(stack, token, bundle)
    tenant_id = client.identity.tenant_id

    def broken(*args, **kwargs):
        raise RuntimeError("outbox unavailable")

    monkeypatch.setattr(control.orchestration.intake, "stage_job", broken)
    with pytest.raises(RuntimeError, match="outbox unavailable"):
        client.call("search_docs", {"query": "x"})
    usage = client.plane.entitlements.usage(tenant_id)
    assert usage == {"daily_calls": 0, "tool_seconds": 0.0, "reservations": 0}


def test_attempts_that_end_without_a_result_give_their_reservations_back(
    stack: Stack, token, tmp_path
):
    """A cancelled job that never went out is undone; one that was sent is charged its whole
    reservation once its result is due (and a result that still comes settles nothing)."""
    from sqlalchemy import update

    from control.orchestration.orchestrator import release_reservations
    from control.orchestration.submission import CallRequest, submit_run
    from ledger.models import Attempt

    bundle = plan_bundle(stack, token, tmp_path, "r", {"daily_calls": 10})
    client = client_on(stack, token, bundle)
    store = client.plane.entitlements
    tenant_id = client.identity.tenant_id
    sleepy = {"seconds": 6.0, "tag": "release"}
    # Staged (reserved) but not yet published; cancelled before the relay sends it.
    with client.plane.sessions() as session:
        staged = submit_run(
            session,
            identity=client.identity,
            request=CallRequest("sleepy", sleepy).as_run(),
            gov=client.plane.governance(),
        )
    assert store.usage(tenant_id)["daily_calls"] == 1
    client.cancel(staged.run_id)
    wait_for(
        lambda: store.usage(tenant_id) == {"daily_calls": 0, "tool_seconds": 0, "reservations": 0},
        timeout=30,
        what="the never-sent job undone",
    )
    # Sent, running, cancelled: its result is due later; make it due now.
    sent = client.submit("sleepy", sleepy)
    job = f"{sent}/sleepy/1"
    wait_for(lambda: stack.starts("sleepy", job) == 1, timeout=30, what="the job to start")
    client.cancel(sent)
    with client.plane.sessions() as session:
        past = "2000-01-01T00:00:00+00:00"
        session.execute(update(Attempt).where(Attempt.run_id == sent).values(due_at=past))
        session.commit()
    # What the control does every 10 s, now (the tool still sleeps; its result comes after).
    release_reservations(client.plane.sessions, store)
    assert store.usage(tenant_id) == {"daily_calls": 1, "tool_seconds": 8.0, "reservations": 0}
    trail = wait_for(
        lambda: "ResultIgnored" in (kinds := [k for k, _ in evidence(client, sent)]) and kinds,
        timeout=30,
        what="the late result",
    )
    assert "ToolCallCompleted" not in trail
    assert store.usage(tenant_id)["tool_seconds"] == 8.0  # settled once, at the reservation
