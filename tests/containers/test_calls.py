"""Governed calls through the API of the containers' control, and the ledger verified."""

from __future__ import annotations

import time

from tests.containers.stack import Stack


def test_one_call_per_tool_and_the_ledger_verifies(cstack: Stack) -> None:
    with cstack.client() as client:
        calls = {
            "search_docs": {"query": "signed receipts for tool results"},
            "read_repo_file": {"path": "src/shipit/deploy.py"},
            "lint_python": {"code": "import os\nos.system('ls')\n"},
        }
        latencies = {}
        for tool, args in calls.items():
            t0 = time.monotonic()
            run = client.call(tool, args, wait=True, timeout=120)
            latencies[tool] = time.monotonic() - t0
            node = run.nodes[0]
            assert node.status == "completed", (tool, node.status, node.error)
            assert node.receipt["key_id"].startswith(f"tool.{tool}")
            assert (
                "no namespaces" in node.result_containment
                if hasattr(node, "result_containment")
                else True
            )
        assert client.verify_ledger().ok
    cstack.timings.update({f"first_call_{t}_s": v for t, v in latencies.items()})
    print("timings", cstack.timings)
