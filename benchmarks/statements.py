"""What one call's submission costs PostgreSQL: statements, round trips and CPU.

Starts a stack on the test services (tests/harness.py), then submits calls in this
process with ``Operations.submit_call`` (the control's own operations) and counts, per
submission, what its connections sent, read from libpq's protocol trace:

- statements: each ``Execute`` (extended protocol) and each simple ``Query`` (BEGIN,
  COMMIT), as the server ran them;
- round trips: each time the client sent and then read the server's answer (statements
  sent in one pipeline share one);

and, over ``--calls`` submissions in a row, the CPU they took: this process's
(``time.process_time``) and that of the PostgreSQL backends serving its connections.

    TOOLPLANE_TEST_REDIS_URL=redis://127.0.0.1:6379 .venv/bin/python -m benchmarks.statements
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
from psycopg.pq import Trace
from sqlalchemy import event

from tests.harness import start_services, start_stack, stop_stack

TOOL, ARGS = "read_repo_file", {"path": "src/shipit/deploy.py"}


class Traced:
    """The protocol trace of every connection of an engine, and its backends' pids."""

    def __init__(self, engine: Any, directory: Path) -> None:
        self.directory, self.files, self.backends = directory, [], set()
        engine.dispose()  # every connection from now on is traced
        event.listen(engine, "connect", self._connect)

    def _connect(self, dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("SELECT pg_backend_pid()")
        self.backends.add(int(cursor.fetchone()[0]))
        cursor.close()
        dbapi_connection.rollback()
        path = self.directory / f"trace-{len(self.files)}.txt"
        handle = path.open("w")
        self.files.append(handle)
        pgconn = dbapi_connection.pgconn
        pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS)
        pgconn.trace(handle.fileno())

    def messages(self) -> list[tuple[str, str]]:
        """The client's messages so far, each (type, its text), in the order of each file."""
        out = []
        for handle in self.files:
            handle.flush()
            for line in Path(handle.name).read_text().splitlines():
                fields = line.split("\t")  # [time\t]F|B\tlength\ttype[\ttext]
                if fields[0] not in ("F", "B") and len(fields) > 1:
                    fields = fields[1:]
                if len(fields) < 3 or fields[0] not in ("F", "B"):
                    continue  # a statement's text, continued
                if fields[0] == "B":  # the server answers: the client waited since it sent
                    if out and out[-1][0] != "(reply)":
                        out.append(("(reply)", ""))
                    continue
                out.append((fields[2], fields[3].strip() if len(fields) > 3 else ""))
        return out

    def backend_cpu_s(self) -> float:
        total = 0.0
        for pid in self.backends:
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total


def _count(messages: list[tuple[str, str]], start: int) -> dict[str, Any]:
    """What the client sent from ``messages[start]`` on (the texts of statements prepared
    before are read from the earlier messages)."""
    kinds = Counter(m for m, _ in messages[start:])
    statements: list[str] = []
    named: dict[str, str] = {}  # prepared statement name -> its text
    pending = ""
    for i, (kind, body) in enumerate(
        messages
    ):  # a Parse carries the text; a Query is its own statement
        if kind == "Parse":
            name, _, sql = body.partition(" ")
            pending = sql
            if name != '""':
                named[name] = sql
        elif kind == "Bind":
            statement = body.split(" ")[1] if " " in body else '""'
            pending = named.get(statement, pending if statement == '""' else "(prepared)")
        elif kind == "Execute" and i >= start:
            statements.append(_label(pending))
        elif kind == "Query" and i >= start:
            statements.append(_label(body))
    return {
        "statements": kinds["Execute"] + kinds["Query"],
        "round_trips": kinds["(reply)"],
        "sequence": statements,
    }


def _label(sql: str) -> str:
    quoted = re.match(r'^"(.*)"(?: \d+)*$', sql)  # a Parse: "text" then its types
    words = (quoted.group(1) if quoted else sql.lstrip('"')).split()
    text = " ".join(words)
    tables = ("runs", "nodes", "attempts", "outbox", "chain_heads", "evidence_events")
    changed = [
        f"{verb} {name}"
        for name in tables
        for verb in ("INSERT", "UPDATE")
        if f"{verb} INTO {name} " in text or f"{verb} {name} " in text
    ]
    if changed:
        return " + ".join(changed) + (" (one statement)" if len(changed) > 1 else "")
    if "pg_advisory" in text:
        return "SELECT advisory locks"
    if "freezes" in text:
        return "SELECT freezes"
    return " ".join(words[:4])[:60]


def measure(calls: int, repeats: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="tp-statements-"))
    services = start_services(tmp / "services")
    stack = start_stack(services, tmp / "home")
    try:
        ops = stack.client(stack.tenant())
        for _ in range(5):  # warm: caches, pools, prepared statements
            ops.submit_call(TOOL, ARGS)
        traced = Traced(ops.plane.engine, tmp)
        for _ in range(10):  # connects (traced), prepares the statements used 5 times
            ops.submit_call(TOOL, ARGS)
        seen = len(traced.messages())
        ops.submit_call(TOOL, ARGS)
        one = _count(traced.messages(), seen)
        rounds = []
        for _ in range(repeats):
            seen = len(traced.messages())
            cpu, pg = time.process_time(), traced.backend_cpu_s()
            for _ in range(calls):
                ops.submit_call(TOOL, ARGS)
            cpu, pg = time.process_time() - cpu, traced.backend_cpu_s() - pg
            counted = _count(traced.messages(), seen)
            rounds.append(
                {
                    "process_cpu_ms": round(cpu * 1000 / calls, 2),
                    "backend_cpu_ms": round(pg * 1000 / calls, 2),
                    "statements": counted["statements"] / calls,
                    "round_trips": counted["round_trips"] / calls,
                }
            )
        return {"one_submission": one, "rounds": rounds, "calls": calls}
    finally:
        stop_stack(stack)
        services.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--label", default=os.environ.get("STATEMENTS_LABEL", ""))
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    result = measure(options.calls, options.repeats) | {"label": options.label}
    if options.json:
        print(json.dumps(result))
        return
    one = result["one_submission"]
    print(
        f"{options.label} one submission: {one['statements']} statements, "
        f"{one['round_trips']} round trips"
    )
    for i, label in enumerate(one["sequence"], 1):
        print(f"  {i:2}. {label}")
    for r in result["rounds"]:
        print(f"{options.label} {result['calls']} submissions: {r}")


if __name__ == "__main__":
    main()
