"""The built-in tools, called directly: search_docs, read_repo_file, lint_python."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sandbox_tasks.errors import ToolFailure
from sandbox_tasks.registry import ToolContext, ToolSpec, load_tools
from sandbox_tasks.safe_open import open_beneath
from sandbox_tasks.tools import lint_python, read_repo_file, search_docs
from toolplane.canonical import canonical_json

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TOOLS = [search_docs.TOOL, read_repo_file.TOOL, lint_python.TOOL]


def make_ctx(tmp_path: Path, **kw: object) -> ToolContext:
    roots = {name: tmp_path / name for name in ("repo", "docs", "scratch")}
    for root in roots.values():
        root.mkdir(exist_ok=True)
    return ToolContext(
        repo_root=roots["repo"], docs_root=roots["docs"], scratch_dir=roots["scratch"], **kw
    )


def call(tool: ToolSpec, ctx: ToolContext, **args: object):
    result = tool.func(tool.args_model.model_validate(args), ctx)
    assert isinstance(result, tool.result_model)
    canonical_json(result.model_dump(mode="json"))  # plain JSON, carried exactly
    return result


def refusal(tool: ToolSpec, ctx: ToolContext, **args: object) -> ToolFailure:
    with pytest.raises(ToolFailure) as info:
        tool.func(tool.args_model.model_validate(args), ctx)
    return info.value


@pytest.fixture
def ctx(tmp_path: Path) -> ToolContext:
    return make_ctx(tmp_path)


# --- the specs ---------------------------------------------------------------


@pytest.mark.parametrize("tool", TOOLS, ids=lambda t: t.name)
def test_manifest_is_canonical_json(tool: ToolSpec) -> None:
    manifest = tool.manifest()
    assert manifest["name"] == tool.name and manifest["version"] == "1.0.0"
    assert manifest["args_schema"]["additionalProperties"] is False
    canonical_json(manifest)


def test_limits_and_roots() -> None:
    assert (search_docs.TOOL.data_roots, search_docs.TOOL.limits.timeout_s) == (("docs",), 10)
    assert search_docs.TOOL.prepare is search_docs.prepare
    assert (read_repo_file.TOOL.data_roots, read_repo_file.TOOL.limits.timeout_s) == (("repo",), 5)
    assert lint_python.TOOL.data_roots == ()
    assert not any(t.follow_symlinks for t in TOOLS)  # no shipped tool reads through one
    assert (lint_python.TOOL.limits.timeout_s, lint_python.TOOL.limits.memory_mb) == (20, 1024)


def test_tools_load_from_their_modules() -> None:
    loaded = load_tools([f"sandbox_tasks.tools.{tool.name}" for tool in TOOLS])
    assert all(loaded[tool.name] is tool for tool in TOOLS)


@pytest.mark.parametrize(
    ("tool", "args"),
    [
        (search_docs.TOOL, {"query": "x", "extra": 1}),
        (read_repo_file.TOOL, {"path": "a", "mode": "w"}),
        (lint_python.TOOL, {"code": "", "fix": True}),
        (search_docs.TOOL, {"query": "x", "top_k": "5"}),  # strict: no coercion
        (read_repo_file.TOOL, {"path": 1}),
        (read_repo_file.TOOL, {"path": "a", "start_line": 0}),
        (read_repo_file.TOOL, {"path": "a", "max_bytes": 1_000_001}),
        (lint_python.TOOL, {"code": "", "select": "E"}),
        (lint_python.TOOL, {"code": "", "select": ["E"] * 11}),
    ],
)
def test_malformed_args_are_validation_errors(tool: ToolSpec, args: dict) -> None:
    with pytest.raises(ValidationError):
        tool.args_model.model_validate(args)


# --- search_docs -------------------------------------------------------------


def write_docs(root: Path) -> None:
    (root / "queues.md").write_text(
        "# Celery queues\n\nRoute slow jobs to their own queue; acknowledge late.\n"
    )
    (root / "receipts.md").write_text(
        "# Signed receipts\n\nEd25519 signatures over canonical JSON receipts.\n"
        "Every receipt names the key id.\n"
    )
    (root / "sub").mkdir()
    (root / "sub" / "notes.txt").write_text("plain notes about ledgers and hash chains\n")
    (root / "ignored.rst").write_text("receipts receipts receipts\n")


def test_search_ranks_the_relevant_doc_first(ctx: ToolContext) -> None:
    write_docs(ctx.docs_root)
    result = call(search_docs.TOOL, ctx, query="  ed25519 receipt signatures  ", top_k=5)
    assert result.query == "ed25519 receipt signatures"
    assert result.indexed_documents == 3
    first = result.hits[0]
    assert (first.path, first.title) == ("receipts.md", "Signed receipts")
    assert "**" in first.snippet and first.score > 0
    hits = call(search_docs.TOOL, ctx, query="hash chains").hits
    assert [(h.path, h.title) for h in hits] == [("sub/notes.txt", "notes")]


def test_search_scores_descend_and_top_k_holds(ctx: ToolContext) -> None:
    for i in range(8):
        (ctx.docs_root / f"d{i}.md").write_text(f"# Doc {i}\n" + "queue " * (i + 1) + "\n")
    hits = call(search_docs.TOOL, ctx, query="queue", top_k=3).hits
    assert len(hits) == 3
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_search_over_the_example_docs(tmp_path: Path) -> None:
    ctx = ToolContext(repo_root=tmp_path, docs_root=EXAMPLES / "docs", scratch_dir=tmp_path)
    cases = {
        "Ed25519 key rotation": "ed25519-receipts.md",
        "visibility timeout redelivery": "celery-queues.md",
        "forbid permit principal": "cedar-policies.md",
        "genesis head hash": "hash-chained-ledger.md",
        "FIFO setrlimit": "sandboxing-tools.md",
    }
    for query, expected in cases.items():
        assert call(search_docs.TOOL, ctx, query=query).hits[0].path == expected, query
    for path in (EXAMPLES / "docs").glob("*.md"):
        assert path.read_text().startswith("# "), path


@pytest.mark.parametrize(
    "query",
    [
        '"',
        'a"b',
        "AND OR NOT",
        "*",
        "NEAR(",
        "NEAR(a b, 2)",
        "col:x",
        "title:secret",
        "body : x",
        "^start",
        "-x",
        "+x",
        "{title body}: x",
        "x*",
        "(",
        ")",
        "'",
        "\\",
        "a\x00b",
        "naïve café",
        "日本語",
        "_",
        "__init__",
    ],
)
def test_hostile_queries_are_only_words(ctx: ToolContext, query: str) -> None:
    write_docs(ctx.docs_root)
    try:
        result = call(search_docs.TOOL, ctx, query=query)
    except ToolFailure as e:
        assert (e.code, e.field) == ("invalid_argument", "query")
    else:
        assert all(hit.path for hit in result.hits)


def test_query_bounds(ctx: ToolContext) -> None:
    write_docs(ctx.docs_root)
    with pytest.raises(ValidationError):
        search_docs.TOOL.args_model.model_validate({"query": "receipt " * 1250})
    long_query = ("receipt " * 125)[:1000]
    assert call(search_docs.TOOL, ctx, query=long_query).hits[0].path == "receipts.md"
    many_words = " ".join(f"w{i}" for i in range(300)) + " receipts"
    assert search_docs.query_terms(many_words)[-1] == "w63"
    for blank in ("   ", "\n\t", "!!!", "?*:()"):
        failure = refusal(search_docs.TOOL, ctx, query=blank)
        assert (failure.code, failure.field) == ("invalid_argument", "query")


def test_index_follows_changed_and_added_files(ctx: ToolContext) -> None:
    write_docs(ctx.docs_root)
    first = search_docs.prepare(ctx)
    assert search_docs.prepare(ctx) is first  # nothing changed: no rebuild
    assert call(search_docs.TOOL, ctx, query="zebra").hits == []
    (ctx.docs_root / "zoo.md").write_text("# Zoo\n\nA zebra.\n")
    assert [h.path for h in call(search_docs.TOOL, ctx, query="zebra").hits] == ["zoo.md"]
    queues = ctx.docs_root / "queues.md"
    queues.write_text("# Celery queues\n\nNow about a zebra too, and more.\n")
    os.utime(queues, ns=(1, 1))
    paths = {h.path for h in call(search_docs.TOOL, ctx, query="zebra").hits}
    assert paths == {"zoo.md", "queues.md"}
    (ctx.docs_root / "zoo.md").unlink()
    assert [h.path for h in call(search_docs.TOOL, ctx, query="zebra").hits] == ["queues.md"]
    assert search_docs.prepare(ctx) is not first


def test_search_uses_prepared_state(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    write_docs(ctx.docs_root)
    index = search_docs.prepare(ctx)
    prepared = make_ctx(tmp_path, state=index)
    (ctx.docs_root / "late.md").write_text("# Late\n\nkangaroo\n")
    assert call(search_docs.TOOL, prepared, query="kangaroo").hits == []  # ctx.state as given
    assert len(call(search_docs.TOOL, ctx, query="kangaroo").hits) == 1


def test_index_skips_outside_links_large_and_odd_files(tmp_path: Path) -> None:
    ctx = make_ctx(tmp_path)
    (tmp_path / "secret.md").write_text("# Secret\n\nplatypus\n")
    (ctx.docs_root / "leak.md").symlink_to(tmp_path / "secret.md")
    (ctx.docs_root / "leakdir").symlink_to(tmp_path, target_is_directory=True)
    (ctx.docs_root / "big.md").write_bytes(b"platypus " * 300_000)
    (ctx.docs_root / "latin1.md").write_bytes(b"caf\xe9 platypus\x00 wombat\n")
    (ctx.docs_root / "inside.md").symlink_to("latin1.md")
    (ctx.docs_root / "## Not a title.md").write_text("  ##  Real title ##\nwombat\n")
    result = call(search_docs.TOOL, ctx, query="platypus wombat", top_k=50)
    # no symlink is indexed, not even one staying inside (see safe_open)
    assert {h.path for h in result.hits} == {"latin1.md", "## Not a title.md"}
    assert result.indexed_documents == 2
    titles = {h.path: h.title for h in result.hits}
    assert titles["## Not a title.md"] == "Real title" and titles["latin1.md"] == "latin1"
    assert all("\x00" not in h.snippet for h in result.hits)


@pytest.fixture(scope="module")
def fuzz_ctx(tmp_path_factory: pytest.TempPathFactory) -> ToolContext:
    ctx = make_ctx(tmp_path_factory.mktemp("fuzz"))
    write_docs(ctx.docs_root)
    return ctx


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(query=st.text(min_size=1, max_size=200))
def test_any_query_is_safe(fuzz_ctx: ToolContext, query: str) -> None:
    try:
        call(search_docs.TOOL, fuzz_ctx, query=query, top_k=50)
    except ToolFailure as e:
        assert e.code == "invalid_argument"


# --- read_repo_file ------------------------------------------------------------

APP = "import os\n\n\ndef main():\n    return os.getcwd()\n"


@pytest.fixture
def repo(tmp_path: Path) -> ToolContext:
    ctx = make_ctx(tmp_path)
    (ctx.repo_root / "src").mkdir()
    (ctx.repo_root / "src" / "app.py").write_text(APP)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text("top secret\n")
    return ctx


def read_refusal(ctx: ToolContext, path: str, code: str, **args: object) -> ToolFailure:
    failure = refusal(read_repo_file.TOOL, ctx, path=path, **args)
    assert failure.code == code, (path, failure.message)
    assert "secret" not in failure.message or "secret" in path
    return failure


def opened_path(root: Path, path: str) -> str:
    """The resolved path ``open_beneath`` gives a tool that follows symlinks."""
    opened = open_beneath(root, path, follow_symlinks=True)
    os.close(opened.fd)
    return opened.path


def follow_refusal(root: Path, path: str, code: str) -> None:
    with pytest.raises(ToolFailure) as info:
        opened_path(root, path)
    assert info.value.code == code, (path, info.value.message)


def test_read_whole_file(repo: ToolContext) -> None:
    result = call(read_repo_file.TOOL, repo, path="src/app.py")
    assert result.content == APP
    assert result.sha256 == hashlib.sha256(APP.encode()).hexdigest()
    assert (result.path, result.size, result.lines) == ("src/app.py", len(APP), 5)
    assert (result.start_line, result.end_line) == (1, 5)
    assert call(read_repo_file.TOOL, repo, path="./src//./app.py").path == "src/app.py"
    assert call(read_repo_file.TOOL, repo, path="src/../src/app.py").content == APP


def test_read_line_ranges(repo: ToolContext) -> None:
    part = call(read_repo_file.TOOL, repo, path="src/app.py", start_line=4, end_line=5)
    assert part.content == "def main():\n    return os.getcwd()\n"
    assert (part.start_line, part.end_line, part.lines) == (4, 5, 5)
    assert part.sha256 == hashlib.sha256(APP.encode()).hexdigest()  # of the whole file
    clamped = call(read_repo_file.TOOL, repo, path="src/app.py", start_line=5, end_line=99)
    assert (clamped.content, clamped.end_line) == ("    return os.getcwd()\n", 5)
    head = call(read_repo_file.TOOL, repo, path="src/app.py", end_line=1)
    assert (head.content, head.start_line) == ("import os\n", 1)
    failure = refusal(read_repo_file.TOOL, repo, path="src/app.py", start_line=3, end_line=2)
    assert (failure.code, failure.field) == ("invalid_argument", "start_line")
    assert refusal(read_repo_file.TOOL, repo, path="src/app.py", start_line=6).code == (
        "invalid_argument"
    )


def test_line_counting(repo: ToolContext) -> None:
    cases = {"": 0, "a": 1, "a\n": 1, "a\nb": 2, "a\r\nb\r\n": 2, "\n\n": 2, "a\x0cb\u2028c": 1}
    for text, lines in cases.items():
        (repo.repo_root / "t.txt").write_bytes(text.encode())
        result = call(read_repo_file.TOOL, repo, path="t.txt")
        assert (result.lines, result.content) == (lines, text), repr(text)
    (repo.repo_root / "t.txt").write_text("one\ntwo")
    assert call(read_repo_file.TOOL, repo, path="t.txt", start_line=2).content == "two"


@pytest.mark.parametrize(
    "path",
    [
        "..",
        "../outside/secret.txt",
        "src/../../outside/secret.txt",
        "./../repo/src/app.py",
        "src/../../../../../../etc/passwd",
        "/etc/passwd",
        "/",
        str(Path("/tmp")),
    ],
)
def test_escapes_are_refused(repo: ToolContext, path: str) -> None:
    read_refusal(repo, path, "path_outside_root")


def test_nul_is_refused(repo: ToolContext) -> None:
    failure = read_refusal(repo, "src/app.py\x00.txt", "invalid_argument")
    assert failure.field == "path"


@pytest.mark.timeout(10)
def test_special_files_are_refused_without_blocking(repo: ToolContext) -> None:
    os.mkfifo(repo.repo_root / "fifo")
    assert "not a regular file" in read_refusal(repo, "fifo", "invalid_argument").message
    (repo.repo_root / "pipe").symlink_to("fifo")
    read_refusal(repo, "pipe", "symlink_refused")
    follow_refusal(repo.repo_root, "pipe", "invalid_argument")
    for directory in ("src", "src/", ".", "src/.."):
        read_refusal(repo, directory, "invalid_argument")


def test_missing_paths(repo: ToolContext) -> None:
    for path in ("nope.py", "src/nope.py", "src/app.py/x", "a/" * 300 + "x"):
        read_refusal(repo, path, "not_found")
    (repo.repo_root / "dangling").symlink_to("nowhere")
    read_refusal(repo, "dangling", "symlink_refused")
    follow_refusal(repo.repo_root, "dangling", "not_found")
    failure = refusal(read_repo_file.TOOL, repo, path="x" * 300)
    assert failure.code in ("invalid_argument", "not_found")
    with pytest.raises(ValidationError):
        read_repo_file.TOOL.args_model.model_validate({"path": "a/" * 2049})
    with pytest.raises(ValidationError):
        read_repo_file.TOOL.args_model.model_validate({"path": ""})


def test_size_is_capped(repo: ToolContext) -> None:
    (repo.repo_root / "ten.txt").write_text("0123456789")
    assert call(read_repo_file.TOOL, repo, path="ten.txt", max_bytes=10).size == 10
    read_refusal(repo, "ten.txt", "too_large", max_bytes=9)
    with open(repo.repo_root / "huge.txt", "wb") as f:
        f.truncate(50_000_000)  # sparse: its size is never trusted, the read is capped
    read_refusal(repo, "huge.txt", "too_large")


def test_binary_and_undecodable_files(repo: ToolContext) -> None:
    (repo.repo_root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    assert "binary" in read_refusal(repo, "image.png", "invalid_argument").message
    (repo.repo_root / "latin1.txt").write_bytes(b"caf\xe9\n")
    assert "UTF-8" in read_refusal(repo, "latin1.txt", "invalid_argument").message
    (repo.repo_root / "utf8.txt").write_text("naïve ☃ \U0001f600\n", encoding="utf-8")
    assert call(read_repo_file.TOOL, repo, path="utf8.txt").content == "naïve ☃ \U0001f600\n"


def test_a_missing_root_is_a_tool_error(tmp_path: Path) -> None:
    ctx = ToolContext(
        repo_root=tmp_path / "gone", docs_root=tmp_path / "gone", scratch_dir=tmp_path
    )
    assert refusal(read_repo_file.TOOL, ctx, path="a.txt").code == "tool_error"
    assert refusal(search_docs.TOOL, ctx, query="anything").code == "not_found"


def test_read_the_example_repo(tmp_path: Path) -> None:
    ctx = ToolContext(repo_root=EXAMPLES / "repo", docs_root=tmp_path, scratch_dir=tmp_path)
    readme = call(read_repo_file.TOOL, ctx, path="README.md")
    assert readme.content.startswith("# ")
    deploy = call(read_repo_file.TOOL, ctx, path="src/shipit/deploy.py")
    assert "shell=True" in deploy.content


# --- lint_python ---------------------------------------------------------------


def test_lint_finds_the_sample_security_issues(ctx: ToolContext) -> None:
    code = (EXAMPLES / "repo" / "src" / "shipit" / "deploy.py").read_text()
    result = call(lint_python.TOOL, ctx, code=code)
    codes = [f.code for f in result.findings]
    assert {"S602", "S307"} <= set(codes)
    assert result.count == len(result.findings) and not result.truncated
    assert result.selected == ["E", "F", "W", "S", "B"]
    assert result.ruff_version[:1].isdigit()
    keys = [(f.line, f.column, f.code) for f in result.findings]
    assert keys == sorted(keys)
    s602 = next(f for f in result.findings if f.code == "S602")
    assert code.splitlines()[s602.line - 1].strip().startswith("return subprocess.call")
    assert s602.end_line >= s602.line


def test_lint_clean_and_selected(ctx: ToolContext) -> None:
    assert call(lint_python.TOOL, ctx, code="x = 1\n").findings == []
    assert call(lint_python.TOOL, ctx, code="").count == 0
    unsorted = "import sys\nimport os\n\nprint(os, sys)\n"
    result = call(lint_python.TOOL, ctx, code=unsorted, select=["I", "I", "F"])
    assert [f.code for f in result.findings] == ["I001"]
    assert result.selected == ["I", "F"]


def test_lint_reports_syntax_errors_as_findings(ctx: ToolContext) -> None:
    result = call(lint_python.TOOL, ctx, code="def f(:\n")
    assert result.count >= 1 and all(f.line >= 1 for f in result.findings)


def test_lint_never_runs_the_code(ctx: ToolContext, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('x')\nimport os\nos.system('touch {marker}')\n"
    call(lint_python.TOOL, ctx, code=code)
    assert not marker.exists()


@pytest.mark.parametrize(
    "select", [["X"], ["E;rm -rf /"], ["--fix"], ["ALL"], ["e"], ["E", "RUF"], [""], []]
)
def test_lint_refuses_unknown_selectors(ctx: ToolContext, select: list[str]) -> None:
    failure = refusal(lint_python.TOOL, ctx, code="x = 1\n", select=select)
    assert (failure.code, failure.field) == ("invalid_argument", "select")


def test_lint_refuses_nul_and_oversized_code(ctx: ToolContext) -> None:
    failure = refusal(lint_python.TOOL, ctx, code="x = 1\x00\n")
    assert (failure.code, failure.field) == ("invalid_argument", "code")
    failure = refusal(lint_python.TOOL, ctx, code="#" * (lint_python.MAX_CODE_CHARS + 1))
    assert (failure.code, failure.field) == ("too_large", "code")
    assert call(lint_python.TOOL, ctx, code="#" * 99 + "\n").count == 0
