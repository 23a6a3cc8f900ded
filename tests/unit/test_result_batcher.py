"""The control's result batcher: what waits goes in one batch, each task gets its own
outcome or error, and a poison message fails only its own task."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from control.ops.batcher import ResultBatcher
from tests.harness import wait_for


class Ingest:
    """Records each batch; holds the first until released; fails on ``poison``."""

    def __init__(self, *, database_down: bool = False) -> None:
        self.batches: list[list[Any]] = []
        self.release = threading.Event()
        self.database_down = database_down

    def __call__(self, raws: Sequence[Any]) -> list[str]:
        self.batches.append(list(raws))
        if len(self.batches) == 1:
            self.release.wait(10)
        if self.database_down:
            raise OperationalError("select 1", {}, Exception("database down"))
        if "poison" in raws:
            raise ValueError("poison")
        return [f"ingested {raw}" for raw in raws]


def submit_while_held(
    batcher: ResultBatcher[str], ingest: Ingest, raws: list[str]
) -> list[Future[str]]:
    """``raws[0]`` alone in the first batch (held), the rest waiting behind it; then go."""
    pool = ThreadPoolExecutor(len(raws))
    first = pool.submit(batcher.submit, raws[0])
    wait_for(lambda: len(ingest.batches) == 1, timeout=10, what="the first batch")
    rest = [pool.submit(batcher.submit, raw) for raw in raws[1:]]
    wait_for(lambda: batcher._queue.qsize() == len(raws) - 1, timeout=10, what="the rest queued")
    ingest.release.set()
    pool.shutdown(wait=True)
    return [first, *rest]


def test_what_waits_is_ingested_in_one_batch_each_with_its_own_outcome() -> None:
    ingest = Ingest()
    batcher: ResultBatcher[str] = ResultBatcher(ingest, max_batch=64)
    futures = submit_while_held(batcher, ingest, ["a", "b", "c", "d"])
    assert [f.result() for f in futures] == ["ingested a", "ingested b", "ingested c", "ingested d"]
    assert ingest.batches == [["a"], ["b", "c", "d"]]


def test_a_batch_is_at_most_max_batch() -> None:
    ingest = Ingest()
    batcher: ResultBatcher[str] = ResultBatcher(ingest, max_batch=2)
    futures = submit_while_held(batcher, ingest, ["a", "b", "c", "d", "e"])
    assert all(f.result().startswith("ingested") for f in futures)
    assert [len(b) for b in ingest.batches] == [1, 2, 2]


def test_a_poison_message_fails_only_its_own_task() -> None:
    ingest = Ingest()
    batcher: ResultBatcher[str] = ResultBatcher(ingest, max_batch=64)
    futures = submit_while_held(batcher, ingest, ["a", "b", "poison", "c"])
    assert futures[1].result() == "ingested b" and futures[3].result() == "ingested c"
    with pytest.raises(ValueError, match="poison"):
        futures[2].result()
    assert ingest.batches[1:] == [["b", "poison", "c"], ["b"], ["poison"], ["c"]]


def test_a_database_error_goes_to_every_task_of_the_batch_to_wait_and_retry() -> None:
    ingest = Ingest(database_down=True)
    batcher: ResultBatcher[str] = ResultBatcher(ingest, max_batch=64)
    futures = submit_while_held(batcher, ingest, ["a", "b", "c"])
    for future in futures:
        with pytest.raises(OperationalError):
            future.result()
    assert ingest.batches == [["a"], ["b", "c"]]  # not split: the database is down for all


def test_the_after_ingest_point_runs_once_per_batch() -> None:
    sizes: list[int] = []
    ingest = Ingest()
    batcher: ResultBatcher[str] = ResultBatcher(ingest, max_batch=64, after_ingest=sizes.append)
    futures = submit_while_held(batcher, ingest, ["a", "b", "c"])
    assert [f.result() for f in futures] == ["ingested a", "ingested b", "ingested c"]
    assert sizes == [1, 2]
