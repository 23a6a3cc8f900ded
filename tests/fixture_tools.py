"""Tools that only the tests register (TOOLPLANE_EXTRA_TOOLS=tests.fixture_tools).

Real worker processes import this module, so it must stay importable on its own.
"""

from __future__ import annotations

import os
import time

from pydantic import BaseModel, ConfigDict, Field

from sandbox_tasks.registry import Limits, ToolContext, ToolSpec


class SleepyArgs(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    seconds: float = Field(ge=0, le=30)
    tag: str = ""  # lets a test tell its calls apart


class SleepyResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    slept: float
    pid: int


def sleepy(args: SleepyArgs, ctx: ToolContext) -> SleepyResult:
    time.sleep(args.seconds)
    return SleepyResult(slept=args.seconds, pid=os.getpid())


TOOLS = [
    ToolSpec(
        name="sleepy",
        version="1.0.0",
        description="Sleeps; counts its executions (for fault tests).",
        args_model=SleepyArgs,
        result_model=SleepyResult,
        func=sleepy,
        limits=Limits(timeout_s=8, cpu_s=5),
        read_only=True,
    )
]


# -- a hostile tool: each action is something an exploited tool would try --


class ProbeArgs(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    action: str
    target: str = ""


class ProbeResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    outcome: str
    detail: dict[str, object] = {}


def probe(args: ProbeArgs, ctx: ToolContext) -> ProbeResult:
    import socket

    action = args.action
    if action in ("connect_redis", "connect_postgres"):
        port = 6379 if action == "connect_redis" else 5432
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return ProbeResult(outcome="connected")
        except OSError as e:
            return ProbeResult(outcome="refused", detail={"error": str(e)})
    if action == "interfaces":  # reaching any other address needs an interface and a route
        try:  # if_nameindex needs a socket, the routes /proc: the layers may refuse both
            return ProbeResult(
                outcome="listed",
                detail={
                    "interfaces": [name for _, name in socket.if_nameindex()],
                    "routes": open("/proc/net/route").read().splitlines()[1:],
                },
            )
        except OSError as e:
            return ProbeResult(outcome="refused", detail={"error": str(e)})
    if action == "write_data_root":
        try:
            (ctx.repo_root / "pwned.txt").write_text("x")
            return ProbeResult(outcome="written")
        except OSError as e:
            return ProbeResult(outcome="refused", detail={"error": str(e)})
    if action == "read_file":
        try:
            data = open(args.target, "rb").read()
            text = data[:4000].decode(errors="replace").replace("\x00", "\n")
            return ProbeResult(outcome="read", detail={"bytes": len(data), "text": text})
        except OSError as e:
            return ProbeResult(outcome="refused", detail={"error": str(e)})
    if action == "nested":  # a large result nested ``target`` levels deep (artifacts)
        deep: dict[str, object] = {"fill": "y" * 70_000}
        for _ in range(int(args.target)):
            deep = {"d": deep}
        return ProbeResult(outcome="nested", detail=deep)
    if action == "nul":  # JSONB cannot store U+0000: an attempt to jam ingest
        return ProbeResult(outcome="a\x00b")
    if action == "environment":
        return ProbeResult(outcome="listed", detail={"env": dict(os.environ)})
    if action == "fork_bomb":
        children = 0
        try:
            for _ in range(10_000):
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                children += 1
        except OSError as e:
            return ProbeResult(outcome="stopped", detail={"children": children, "error": str(e)})
        return ProbeResult(outcome="unbounded", detail={"children": children})
    if action == "allocate":
        hoard = [bytearray(64 * 1024 * 1024) for _ in range(64)]  # 4 GiB
        return ProbeResult(outcome="allocated", detail={"blocks": len(hoard)})
    if action == "loop":
        while True:
            pass
    if action == "print_gigabytes":
        chunk = "x" * (1 << 20)
        for _ in range(2048):
            print(chunk)
        return ProbeResult(outcome="printed", detail={"huge": chunk * 64})
    raise ValueError(f"unknown action {action!r}")


TOOLS.append(
    ToolSpec(
        name="probe",
        version="1.0.0",
        description="Tries what an exploited tool would try (security tests only).",
        args_model=ProbeArgs,
        result_model=ProbeResult,
        func=probe,
        limits=Limits(timeout_s=4, cpu_s=2, memory_mb=256, output_bytes=200_000, processes=16),
        data_root="repo",
    )
)


# -- a tool with egress: it may fetch only from the host the test stack declares --


class FetchArgs(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    url: str
    max_bytes: int = 100_000


class FetchResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    status: int
    body: str


def fetcher(args: FetchArgs, ctx: ToolContext) -> FetchResult:
    from sandbox_tasks.errors import ToolFailure

    if ctx.fetch is None:
        raise ToolFailure("tool_error", "no egress capability")
    response = ctx.fetch(args.url, max_bytes=args.max_bytes)
    return FetchResult(status=response.status, body=response.body.decode(errors="replace"))


TOOLS.append(
    ToolSpec(
        name="fetcher",
        version="1.0.0",
        description="Fetches a URL through the egress capability (tests only).",
        args_model=FetchArgs,
        result_model=FetchResult,
        func=fetcher,
        limits=Limits(timeout_s=8),
        egress=tuple(filter(None, os.environ.get("TP_TEST_EGRESS", "").split(","))),
    )
)


# -- a plugin tool that brings its own data root ("fixture", TOOLPLANE_DATA_ROOTS) --


class RootedArgs(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    path: str = ""  # relative to the tool's own root
    peek: str = ""  # an absolute path elsewhere (the repository's): must stay unseen


class RootedResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    content: str
    root: str
    peeked: str  # what reading ``peek`` gave: "read: ..." or the error


def rooted(args: RootedArgs, ctx: ToolContext) -> RootedResult:
    from sandbox_tasks.safe_open import open_beneath, read_at_most

    root = ctx.root("fixture")
    content = ""
    if args.path:
        opened = open_beneath(root, args.path)
        try:
            content = read_at_most(opened.fd, 10_000).decode(errors="replace")
        finally:
            os.close(opened.fd)
    peeked = ""
    if args.peek:
        try:
            with open(args.peek, "rb") as seen:
                peeked = "read: " + seen.read(200).decode(errors="replace")
        except OSError as e:
            peeked = f"{type(e).__name__}: {e.strerror}"
    try:
        ctx.root("repo")
    except Exception as e:  # the repository is not this tool's to name either
        peeked += f" | root('repo'): {e}"
    return RootedResult(content=content, root=str(root), peeked=peeked)


TOOLS.append(
    ToolSpec(
        name="rooted",
        version="1.0.0",
        description="Reads a file of its own data root, 'fixture' (tests only).",
        args_model=RootedArgs,
        result_model=RootedResult,
        func=rooted,
        limits=Limits(timeout_s=5),
        read_only=True,
        data_roots=("fixture",),
    )
)
