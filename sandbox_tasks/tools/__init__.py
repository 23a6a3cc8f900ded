"""The built-in tools: search_docs, read_repo_file and lint_python.

Each module defines ``TOOL``, a ``ToolSpec``; they are registered through the
``toolplane.tools`` entry points in pyproject.toml.
"""

__all__: list[str] = []
