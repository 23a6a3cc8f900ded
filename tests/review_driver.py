"""Drives a tool's runners directly, as a worker user would (security review tests only).

``python -m tests.review_driver SPEC_JSON`` (as root): drops to ``uid``/``gid``, builds the
executor the worker would (``plain``: runners without namespaces; ``bwrap``), with every
kernel layer this host has unless ``layers`` says otherwise, runs each call of ``calls``
(tenant, code; ``{worker}`` in the code is this process's pid, as the worker's would be)
with the ``review_probe`` tool, and prints one JSON line: each call's
outcome, the number of runners replaced, and what ``after`` (code run by the driver, as
the worker user, once the calls are done) found.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(spec: dict) -> dict:
    os.setgroups([])
    os.setgid(spec["gid"])
    os.setuid(spec["uid"])
    from sandbox_tasks.bwrap import BwrapExecutor, bwrap_path
    from sandbox_tasks.confine import available
    from sandbox_tasks.plain import PlainExecutor
    from sandbox_tasks.registry import ToolContext, load_tools

    tool = load_tools(["tests.review_tools"])["review_probe"]
    layers = tuple(spec.get("layers", [n for n in available() if n != "rlimits"]))
    roots = {"repo": Path(spec["repo"])}
    common = {"spec": tool, "roots": roots, "extra_modules": ["tests.review_tools"]}
    if spec["kind"] == "plain":
        executor = PlainExecutor(**common, scratch_root=Path(spec["scratch"]), layers=layers)
    else:
        executor = BwrapExecutor(
            **common, binary=bwrap_path(), forbidden=[Path(spec["secret"])], layers=layers
        )
    ctx = ToolContext(scratch_dir=Path(spec["scratch"]), repo_root=roots["repo"], roots=roots)
    outcomes = []
    try:
        for call in spec["calls"]:
            args = tool.args_model(code=call["code"].replace("{worker}", str(os.getpid())))
            outcome = executor.run(tool, args, ctx, tenant=call["tenant"])
            outcomes.append(
                {"ok": outcome.ok, "result": outcome.result, "error": outcome.error_message}
            )
        found: dict[str, str] = {}
        if spec.get("after"):
            exec(spec["after"], {"out": found, "os": os, "executor": executor})  # noqa: S102
    finally:
        executor.close()
    return {"outcomes": outcomes, "replaced": executor.replaced, "after": found}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
