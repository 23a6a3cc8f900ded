"""The links `ledger verify` checks between events (ledger/links.py)."""

from __future__ import annotations

from typing import Any

from ledger.links import LinkChecker

RUN, NODE = "run_1", "read"


def decision(decision_id: str, outcome: str, version: str = "v1") -> dict[str, Any]:
    return {
        "node_id": NODE,
        "decision_id": decision_id,
        "decision": outcome,
        "bundle_version": version,
    }


def dispatch(
    decision_id: str, *, approval: str | None = None, attempt: int = 1, version: str = "v1"
) -> dict[str, Any]:
    envelope = {"run_id": RUN, "node_id": NODE, "policy_decision_id": decision_id,
                "policy_version": version, "approval_id": approval}  # fmt: skip
    return {"node_id": NODE, "attempt": attempt, "envelope_sha256": f"d{attempt}",
            "envelope": {"envelope": envelope, "signature": "x"}}  # fmt: skip


def result(attempt: int = 1, bound: str | None = None) -> dict[str, Any]:
    digest = f"d{attempt}"
    return {"node_id": NODE, "attempt": attempt, "envelope_sha256": digest,
            "message": {"result": {"envelope_sha256": bound or digest}}}  # fmt: skip


def test_an_honest_run_links() -> None:
    links = LinkChecker()
    assert links.feed("PolicyDecision", RUN, decision("dec1", "allow")) == []
    assert links.feed("ToolCallDispatched", RUN, dispatch("dec1")) == []
    assert links.feed("ToolCallCompleted", RUN, result()) == []


def test_an_approved_run_links() -> None:
    links = LinkChecker()
    links.feed("PolicyDecision", RUN, decision("dec1", "approval_required"))
    request = {"approval_id": "ap1", "node_id": NODE, "args_sha256": "a", "policy_version": "v1"}
    links.feed("ApprovalRequested", RUN, request)
    assert links.feed("ApprovalGranted", RUN, dict(request, by="rita")) == []
    assert links.feed("ToolCallDispatched", RUN, dispatch("dec1", approval="ap1")) == []


def test_broken_links_are_named() -> None:
    links = LinkChecker()
    links.feed("PolicyDecision", RUN, decision("dec1", "deny"))
    links.feed("PolicyDecision", RUN, decision("dec2", "approval_required"))
    assert links.feed("ToolCallDispatched", RUN, dispatch("dec1")) == [
        "link: dispatched without approval under a 'deny' decision"
    ]
    assert (
        "never granted"
        in links.feed("ToolCallDispatched", RUN, dispatch("dec2", approval="ap9"))[0]
    )
    assert "no PolicyDecision" in links.feed("ToolCallDispatched", RUN, dispatch("nope"))[0]
    assert "no PolicyDecision" in links.feed("ToolCallDispatched", "run_2", dispatch("dec1"))[1]
    assert (
        "policy version" in links.feed("ToolCallDispatched", RUN, dispatch("dec1", version="v2"))[0]
    )
    granted = {"approval_id": "ap1", "node_id": NODE, "args_sha256": "a", "policy_version": "v1"}
    assert "never requested" in links.feed("ApprovalGranted", RUN, granted)[0]
    assert "no dispatch" in links.feed("ToolCallCompleted", RUN, result(attempt=7))[0]
    links.feed("PolicyDecision", RUN, decision("dec3", "allow"))
    links.feed("ToolCallDispatched", RUN, dispatch("dec3", attempt=2))
    assert "does not bind" in links.feed("ToolCallFailed", RUN, result(attempt=2, bound="other"))[0]
