"""The links between a chain's events, checked in chain order (pure).

Hashes and signatures show that each event is what was recorded; these checks show
that the events agree with one another, so that evidence inserted with a valid chain
(by whoever can write the table and recompute hashes) but no history behind it is named:

- a ``ToolCallDispatched`` envelope names a ``PolicyDecision`` recorded before it for
  the same run and node, with the same policy version, that allowed the call, or that
  required an approval and an ``ApprovalGranted`` of the envelope's approval id for
  that node came before;
- an ``ApprovalGranted`` follows the ``ApprovalRequested`` of its approval id for the
  same run and node, with the same arguments hash and policy version;
- a ``ToolCallCompleted`` or ``ToolCallFailed`` follows the dispatch of its node and
  attempt, and its receipt's result binds that envelope's digest.

(The envelope's own signature and digest are checked with the other signatures.)
"""

from __future__ import annotations

from typing import Any

__all__ = ["LinkChecker"]


def _get(value: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


class LinkChecker:
    """Feed one chain's events in order; each call returns the problems of that event."""

    def __init__(self) -> None:
        self.decisions: dict[str, tuple[str | None, Any, Any, Any]] = {}
        self.requested: dict[str, tuple[str | None, Any, Any, Any]] = {}
        self.granted: dict[str, tuple[str | None, Any]] = {}
        self.dispatched: dict[tuple[str | None, Any, Any], Any] = {}

    def feed(self, kind: str, run_id: str | None, payload: dict[str, Any]) -> list[str]:
        node = payload.get("node_id")
        if kind == "PolicyDecision" and isinstance(payload.get("decision_id"), str):
            self.decisions[payload["decision_id"]] = (
                run_id,
                node,
                payload.get("decision"),
                payload.get("bundle_version"),
            )
        elif kind == "ApprovalRequested" and isinstance(payload.get("approval_id"), str):
            self.requested[payload["approval_id"]] = (
                run_id,
                node,
                payload.get("args_sha256"),
                payload.get("policy_version"),
            )
        elif kind == "ApprovalGranted":
            return self._granted(run_id, node, payload)
        elif kind == "ToolCallDispatched":
            return self._dispatched(run_id, node, payload)
        elif kind in ("ToolCallCompleted", "ToolCallFailed"):
            return self._settled(run_id, node, payload)
        return []

    def _granted(self, run_id: str | None, node: Any, payload: dict[str, Any]) -> list[str]:
        approval = payload.get("approval_id")
        request = self.requested.get(approval) if isinstance(approval, str) else None
        if request is None or request[:2] != (run_id, node):
            return [f"link: approval {approval} was never requested for node {node} of this run"]
        self.granted[approval] = (run_id, node)  # type: ignore[index]
        if (payload.get("args_sha256"), payload.get("policy_version")) != request[2:]:
            return [f"link: approval {approval} grants other arguments or another policy version"]
        return []

    def _dispatched(self, run_id: str | None, node: Any, payload: dict[str, Any]) -> list[str]:
        envelope = _get(payload, "envelope", "envelope") or {}
        self.dispatched[(run_id, node, payload.get("attempt"))] = payload.get("envelope_sha256")
        problems = []
        if (envelope.get("run_id"), envelope.get("node_id")) != (run_id, node):
            problems.append("link: the envelope names another run or node than its event")
        decision_id = envelope.get("policy_decision_id")
        decision = self.decisions.get(decision_id) if isinstance(decision_id, str) else None
        if decision is None or decision[:2] != (run_id, node):
            problems.append(
                f"link: the envelope's decision {decision_id} is no PolicyDecision recorded "
                f"before it for node {node} of this run"
            )
            return problems
        if decision[3] != envelope.get("policy_version"):
            problems.append(
                f"link: the envelope's policy version is not its decision's ({decision[3]})"
            )
        approval = envelope.get("approval_id")
        if approval is None:
            if decision[2] != "allow":
                problems.append(
                    f"link: dispatched without approval under a {decision[2]!r} decision"
                )
        elif self.granted.get(approval) != (run_id, node):
            problems.append(f"link: the envelope's approval {approval} was never granted for it")
        elif decision[2] != "approval_required":
            problems.append(f"link: an approval under a {decision[2]!r} decision")
        return problems

    def _settled(self, run_id: str | None, node: Any, payload: dict[str, Any]) -> list[str]:
        key = (run_id, node, payload.get("attempt"))
        if key not in self.dispatched:
            return [f"link: no dispatch of node {node} attempt {key[2]} came before its result"]
        digest = self.dispatched[key]
        bound = _get(payload, "message", "result", "envelope_sha256")
        if payload.get("envelope_sha256") != digest or bound != digest:
            return ["link: the receipt does not bind the envelope dispatched for this attempt"]
        return []
