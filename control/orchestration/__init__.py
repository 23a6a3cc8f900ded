"""Runs and their nodes: intake and decision, dispatch and the outbox, result ingest,
workflows (DAGs), the state machines and sweeper, run views, and the operations the API
carries out for a principal."""

__all__: list[str] = []
