"""``python -m sandbox_tasks TOOL``: the same as ``toolplane-worker TOOL``."""

from sandbox_tasks.cli import main

raise SystemExit(main())
