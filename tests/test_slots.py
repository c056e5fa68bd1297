"""Who gets a node's GPUs (offline_queue/slots.py): free GPUs to the best waiting tier first,
only as many lower-tier holders yield as higher-tier waiters need, never to an equal tier; and
the seats' rows in the store, alive while they beat."""

from __future__ import annotations

from pathlib import Path

from offline_queue.batch_object import Shards
from offline_queue.batches import batch_object
from offline_queue.slots import Seat, plan
from offline_queue.store import batches
from offline_queue.store.slots import SeatRow, batch_shards
from tests.test_store import submission


def seat(shard: str, tier: int, holding: bool, since: float = 0.0) -> SeatRow:
    return SeatRow(shard, f"batch-{shard}", tier, holding, since)


def test_free_gpus_go_to_the_best_tier_first_then_first_come() -> None:
    seats = [seat("bulk", 3, False, 1), seat("std-late", 2, False, 5), seat("std", 2, False, 3)]
    assert plan(seats, 1).granted == {"std"}
    assert plan(seats, 2).granted == {"std", "std-late"}
    assert plan(seats, 3).granted == {"std", "std-late", "bulk"}
    assert not plan(seats, 3).yielding


def test_only_as_many_lower_tiers_yield_as_higher_waiters_need() -> None:
    holders = [seat("b1", 3, True, 1), seat("b2", 3, True, 2), seat("s1", 2, True, 0)]
    one = plan([*holders, seat("c1", 1, False)], 3)
    assert one.yielding == {"b2"} and not one.granted  # the lowest tier, the latest holder
    two = plan([*holders, seat("c1", 1, False), seat("c2", 1, False)], 3)
    assert two.yielding == {"b1", "b2"}
    three = plan([*holders, *(seat(f"c{i}", 1, False) for i in range(4))], 3)
    assert three.yielding == {"b1", "b2", "s1"}  # a standard one too, and no more
    # A free GPU serves the first waiter; only the second needs a hand-over.
    assert plan([*holders, seat("c1", 1, False), seat("c2", 1, False)], 4).yielding == {"b2"}


def test_a_yielded_holder_waits_behind_the_higher_tier_and_comes_back_after() -> None:
    after_yield = [seat("c1", 1, False, 5), seat("b1", 3, False, 6)]
    assert plan(after_yield, 1).granted == {"c1"}
    assert plan([seat("b1", 3, False, 6)], 1).granted == {"b1"}


def test_no_one_yields_to_an_equal_or_lower_tier() -> None:
    holders = [seat("s1", 2, True)]
    assert not plan([*holders, seat("s2", 2, False), seat("b", 3, False)], 1).yielding
    assert not plan([*holders, seat("s2", 2, False), seat("b", 3, False)], 1).granted


def test_seats_beat_and_leave_in_the_store(db_url: str) -> None:
    bulk = Seat(db_url, "gpu:g:n", 1, "bulk", "batch-b", 3).start()
    assert bulk.may_take()
    bulk.set_holding(True)
    critical = Seat(db_url, "gpu:g:n", 1, "crit", "batch-c", 1).start()
    try:
        assert not critical.may_take() and not critical.must_yield()
        assert bulk.must_yield()
        assert batch_shards(db_url, "batch-b").running == 1
        assert batch_shards(db_url, "batch-c").waiting == 1
        bulk.set_holding(False)
        assert critical.may_take() and not bulk.may_take()
    finally:
        bulk.stop()
        critical.stop()
    assert batch_shards(db_url, "batch-b").running == 0
    other = Seat(db_url, "gpu:g:other-node", 1, "elsewhere", "batch-b", 3).start()
    try:  # another node's GPUs are other seats
        assert other.may_take()
    finally:
        other.stop()


def test_the_batch_object_shows_its_shards_running_and_waiting(db_url: str, tmp_path: Path) -> None:
    """`offline-queue status` and the API's batch object say how many shards serve the batch
    and how many wait for a GPU, while any is live; nothing once none is."""
    batch, _ = batches.register_batch(db_url, submission("batch_shown", folder=tmp_path))
    assert batch_object(db_url, batch).shards is None
    serving = Seat(db_url, "gpu:g:a", 1, "s1", batch.id, 3).start()
    waiting = Seat(db_url, "gpu:g:a", 1, "s2", batch.id, 3).start()
    try:
        serving.set_holding(True)
        waiting.look()
        assert batch_object(db_url, batch).shards == Shards(running=1, waiting=1)
    finally:
        serving.stop()
        waiting.stop()
    assert batch_object(db_url, batch).shards is None


def test_new_shards_go_to_the_nodes_with_free_gpus_one_gpu_each() -> None:
    from flows.shard import place

    free = {"a": 1, "b": 2, "c": 0, "here": 1}
    assert place(free, 3, here="here") == ["b", "b", "a"]  # "here" keeps its GPU for its run
    assert place(free, 5, here="here") == ["b", "b", "a", None, None]  # the rest: any node
    assert place({}, 2) == [None, None]
    assert place({"x": 4}, 2, here="x") == ["x", "x"]
