"""search_docs: ranked full-text search over the documentation tree.

The index is SQLite FTS5 in memory, ranked by bm25. The user's query is never
passed as FTS syntax: it is cut into words, each quoted as an FTS string, and
the words are OR-ed. ``prepare`` builds the index once per docs root and
rebuilds it only when a file's path, size or mtime changed.
"""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from sandbox_tasks.errors import ToolFailure
from sandbox_tasks.registry import Limits, ToolContext, ToolSpec
from sandbox_tasks.safe_open import open_beneath, read_at_most

SUFFIXES = (".md", ".txt")
MAX_FILE_BYTES = 2 * 1024 * 1024
MAX_FILES = 10_000
MAX_TERMS = 64
_WORD = re.compile(r"\w+")

__all__ = ["DocsIndex", "SearchDocsArgs", "SearchDocsResult", "prepare", "search_docs", "TOOL"]

Signature = tuple[tuple[str, int, int], ...]


class SearchDocsArgs(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    query: str = Field(min_length=1, max_length=1000, description="Words to look for")
    top_k: int = Field(default=5, ge=1, le=50, description="How many hits at most")


class DocHit(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    title: str
    path: str  # posix, relative to the docs root
    snippet: str
    score: float  # higher is better (negated bm25)


class SearchDocsResult(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    query: str
    hits: list[DocHit]
    indexed_documents: int


@dataclass
class DocsIndex:
    """An in-memory FTS5 index of one docs root, as of ``signature``."""

    root: str
    signature: Signature
    conn: sqlite3.Connection
    documents: int
    lock: threading.Lock = field(default_factory=threading.Lock)

    def search(self, terms: list[str], top_k: int) -> list[DocHit]:
        match = " OR ".join('"' + term.replace('"', '""') + '"' for term in terms)
        sql = (
            "SELECT path, title, snippet(docs, 2, '**', '**', '…', 16), bm25(docs, 0.0, 4.0, 1.0)"
            " FROM docs WHERE docs MATCH ? ORDER BY bm25(docs, 0.0, 4.0, 1.0), path LIMIT ?"
        )
        with self.lock:
            rows = self.conn.execute(sql, (match, top_k)).fetchall()
        return [
            DocHit(title=title, path=path, snippet=snippet, score=round(-rank, 6) + 0.0)
            for path, title, snippet, rank in rows
        ]


_CACHE: dict[str, DocsIndex] = {}
_CACHE_LOCK = threading.Lock()


def _candidates(root: Path) -> Signature:
    """(relative path, size, mtime_ns) of every doc file under ``root``, sorted."""
    found: list[tuple[str, int, int]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(SUFFIXES) or name.startswith("."):
                continue
            full = Path(dirpath, name)
            try:
                if full.is_symlink():  # read through no symlink (see safe_open)
                    continue
                info = full.stat()
                rel = full.relative_to(root).as_posix()
                rel.encode("utf-8")
            except (OSError, ValueError):  # vanished, loops, undecodable names
                continue
            if stat.S_ISREG(info.st_mode):
                found.append((rel, info.st_size, info.st_mtime_ns))
            if len(found) >= MAX_FILES:
                return tuple(sorted(found))
    return tuple(sorted(found))


def _read_doc(root: Path, rel: str) -> str | None:
    try:
        opened = open_beneath(root, rel)
    except ToolFailure:
        return None
    try:
        data = read_at_most(opened.fd, MAX_FILE_BYTES + 1)
    finally:
        os.close(opened.fd)
    if len(data) > MAX_FILE_BYTES:
        return None
    return data.decode("utf-8", errors="replace").replace("\x00", "\ufffd")


def _title(text: str, rel: str) -> str:
    """The first ATX heading (``# Title``), else the file's stem."""
    for line in text.splitlines():
        stripped = line.lstrip(" ")
        hashes = len(stripped) - len(stripped.lstrip("#"))
        if len(line) - len(stripped) > 3 or not 1 <= hashes <= 6:
            continue
        rest = stripped[hashes:]
        if rest[:1] in (" ", "\t") and (title := rest.strip().rstrip("#").strip()):
            return title[:200]
    return Path(rel).stem[:200]


def _build(root: Path, signature: Signature) -> DocsIndex:
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    conn.execute("CREATE VIRTUAL TABLE docs USING fts5(path UNINDEXED, title, body)")
    count = 0
    for rel, size, _mtime in signature:
        if size > MAX_FILE_BYTES:
            continue
        text = _read_doc(root, rel)
        if text is None:
            continue
        conn.execute("INSERT INTO docs VALUES (?, ?, ?)", (rel, _title(text, rel), text))
        count += 1
    conn.commit()
    return DocsIndex(root=str(root), signature=signature, conn=conn, documents=count)


def prepare(ctx: ToolContext) -> DocsIndex:
    """The index of the ``docs`` root, rebuilt only when its files changed."""
    root = Path(os.path.abspath(ctx.root("docs")))
    if not root.is_dir():
        raise ToolFailure("not_found", f"docs root {str(root)!r} is not a directory")
    signature = _candidates(root)
    with _CACHE_LOCK:
        cached = _CACHE.get(str(root))
        if cached is not None and cached.signature == signature:
            return cached
        index = _build(root, signature)
        _CACHE[str(root)] = index  # a replaced index closes when its last user drops it
        return index


def query_terms(query: str) -> list[str]:
    """The distinct words of ``query``, in order, at most MAX_TERMS."""
    terms = dict.fromkeys(word.casefold() for word in _WORD.findall(query))
    return list(terms)[:MAX_TERMS]


def search_docs(args: SearchDocsArgs, ctx: ToolContext) -> SearchDocsResult:
    query = args.query.strip()
    if not query:
        raise ToolFailure("invalid_argument", "query: must not be blank", field="query")
    terms = query_terms(query)
    if not terms:
        raise ToolFailure("invalid_argument", "query: contains no words", field="query")
    index = ctx.state if isinstance(ctx.state, DocsIndex) else prepare(ctx)
    try:
        hits = index.search(terms, args.top_k)
    except sqlite3.Error as e:
        raise ToolFailure("tool_error", f"search failed: {e}") from e
    return SearchDocsResult(query=query, hits=hits, indexed_documents=index.documents)


TOOL = ToolSpec(
    name="search_docs",
    version="1.0.0",
    description=(
        "Ranked full-text search (SQLite FTS5, bm25) over the Markdown and text "
        "documentation. Any word of the query may match; returns titles, paths, "
        "snippets and scores (higher is better)."
    ),
    args_model=SearchDocsArgs,
    result_model=SearchDocsResult,
    func=search_docs,
    limits=Limits(timeout_s=10, memory_mb=512),
    read_only=True,
    data_roots=("docs",),
    prepare=prepare,
)
