"""Unit tests of the hand-off queue (:mod:`aiopgpool.waiting`): no server, no pool.

FIFO waiters, LIFO ready items, direct hand-off (a newcomer never takes an
item from under a woken waiter), withdraw on cancellation, one sweep timer
for every deadline, ``fail_waiters``, counted free items, outside waiters.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
from time import monotonic
from typing import Any

import pytest
from fakes import settle

from aiopgpool.waiting import SWEEP_INTERVAL, HandoffQueue, WaitTimeout


class Free:
    """A free item, numbered in the order the queue makes them."""

    _ids = itertools.count(1)

    def __init__(self) -> None:
        self.id = next(self._ids)


def ready(item: Any) -> bool:
    return not isinstance(item, Free)


def make_queue(free: int = 0) -> HandoffQueue[Any]:
    queue: HandoffQueue[Any] = HandoffQueue(Free, free)
    queue.bind(asyncio.get_running_loop())
    return queue


async def getter(queue: HandoffQueue[Any], got: list[Any], timeout: float | None = None) -> Any:
    """What the core does: take one at once, else join the line and await, withdraw if cancelled."""
    item = queue.get_nowait()
    if item is not None:
        got.append(item)
        return item
    fut = queue.join(timeout, monotonic())
    try:
        item = await fut
    except BaseException as exc:
        if not isinstance(exc, WaitTimeout):
            handed = queue.withdraw(fut)
            if handed is not None:  # the core passes it on (release_slot)
                queue.put(handed, ready(handed))
        raise
    got.append(item)
    return item


# -- FIFO hand-off --------------------------------------------------------------------


async def test_waiters_are_served_in_arrival_order() -> None:
    queue = make_queue()
    got: list[Any] = []
    tasks = []
    for i in range(5):
        tasks.append(asyncio.create_task(getter(queue, got), name=f"w{i}"))
        await settle(2)
    assert queue.waiting == 5
    for item in "abcde":
        queue.put(item, True)
    results = await asyncio.gather(*tasks)
    assert results == list("abcde")  # the first waiter got the first item, and so on
    assert got == list("abcde")
    assert queue.waiting == 0
    assert len(queue) == 0


async def test_put_hands_over_directly_and_a_newcomer_gets_nothing() -> None:
    queue = make_queue()
    first = queue.join(None, monotonic())
    second = queue.join(None, monotonic())
    queue.put("a", True)
    # The item went to the first waiter's future in put() itself: nothing is
    # kept for a newcomer to take before the woken waiter runs.
    assert first.done() and first.result() == "a"
    assert not second.done()
    assert queue.get_nowait() is None
    assert len(queue) == 0 and queue.free == 0
    assert queue.waiting == 1
    queue.put("b", False)  # a free item too goes to the waiter, not to the count
    assert second.result() == "b"
    assert queue.free == 0 and queue.waiting == 0


async def test_a_newcomer_task_never_overtakes_a_woken_waiter() -> None:
    queue = make_queue()
    got: list[Any] = []
    waiter = asyncio.create_task(getter(queue, got))
    await settle(2)
    queue.put("only", True)
    # In the same tick, before the waiter's task resumes, a newcomer arrives.
    newcomer = asyncio.create_task(getter(queue, got))
    await settle(3)
    assert waiter.done() and waiter.result() == "only"
    assert not newcomer.done()
    assert queue.waiting == 1
    queue.put("next", True)
    assert await newcomer == "next"


async def test_put_skips_waiters_already_done() -> None:
    queue = make_queue()
    timed_out = queue.join(None, monotonic())
    live = queue.join(None, monotonic())
    timed_out.cancel()
    assert queue.withdraw(timed_out) is None
    assert queue.waiting == 1
    queue.put("a", True)
    assert live.result() == "a"
    assert queue.waiting == 0


# -- LIFO ready items, counted free items ----------------------------------------------


async def test_ready_items_are_last_in_first_out_and_free_items_come_after() -> None:
    queue = make_queue(free=2)
    for item in "abc":
        queue.put(item, True)
    assert list(queue) == list("abc")  # bottom first
    assert [queue.get_nowait() for _ in range(3)] == list("cba")
    first_free, second_free = queue.get_nowait(), queue.get_nowait()
    assert isinstance(first_free, Free) and isinstance(second_free, Free)
    assert first_free is not second_free  # made on demand, one per take
    assert queue.free == 0
    assert queue.get_nowait() is None


async def test_free_items_are_only_counted() -> None:
    made = 0

    def make() -> object:
        nonlocal made
        made += 1
        return object()

    queue: HandoffQueue[Any] = HandoffQueue(make, 10**9)
    assert queue.free == 10**9 and made == 0
    assert queue.take_free_one() is not None
    assert made == 1 and queue.free == 10**9 - 1
    queue.put(object(), False)  # a free item given back is counted, not kept
    assert queue.free == 10**9 and len(queue) == 0


async def test_add_free_hands_to_waiters_first_then_counts() -> None:
    queue = make_queue()
    first = queue.join(None, monotonic())
    second = queue.join(None, monotonic())
    queue.add_free(3)
    assert isinstance(first.result(), Free) and isinstance(second.result(), Free)
    assert first.result() is not second.result()
    assert queue.waiting == 0
    assert queue.free == 1


async def test_add_free_skips_cancelled_waiters() -> None:
    queue = make_queue()
    gone = queue.join(None, monotonic())
    live = queue.join(None, monotonic())
    gone.cancel()
    assert queue.withdraw(gone) is None
    queue.add_free(2)
    assert isinstance(live.result(), Free)
    assert queue.free == 1


async def test_take_free_removes_at_most_what_is_kept() -> None:
    queue = make_queue(free=3)
    assert queue.take_free(2) == 2
    assert queue.free == 1
    assert queue.take_free(5) == 1
    assert queue.free == 0
    assert queue.take_free(1) == 0
    assert queue.take_free_one() is None


async def test_take_keeps_the_others_in_order() -> None:
    queue = make_queue()
    for item in [1, 2, 3, 4, 5]:
        queue.put(item, True)
    items = queue.items
    assert queue.take(lambda n: n % 2 == 0) == [2, 4]
    assert list(queue) == [1, 3, 5]
    assert queue.items is items  # the same deque: the core's hot path holds it


async def test_swap_top_exchanges_a_no_longer_ready_item_for_the_top_one() -> None:
    queue = make_queue()
    assert queue.swap_top("dead") is None
    queue.put("a", True)
    queue.put("b", True)
    assert queue.swap_top("dead") == "b"
    assert queue.free == 1  # the dead item's place is free now
    assert list(queue) == ["a"]


# -- withdraw: a waiter cancelled in the same tick as its hand-off ---------------------


async def test_withdraw_passes_an_item_handed_over_to_the_next_waiter() -> None:
    queue = make_queue()
    got: list[Any] = []
    first = asyncio.create_task(getter(queue, got))
    await settle(2)
    second = asyncio.create_task(getter(queue, got))
    await settle(2)
    queue.put("conn", True)
    first.cancel()  # same tick: its future already holds the item
    assert await second == "conn"
    with pytest.raises(asyncio.CancelledError):
        await first
    assert got == ["conn"]
    assert queue.waiting == 0
    assert len(queue) == 0 and queue.free == 0


async def test_withdraw_keeps_the_item_when_nobody_else_waits() -> None:
    queue = make_queue()
    got: list[Any] = []
    ready_one = asyncio.create_task(getter(queue, got))
    free_one = asyncio.create_task(getter(queue, got))
    await settle(2)
    queue.put("conn", True)
    queue.put(Free(), False)
    ready_one.cancel()
    free_one.cancel()
    await asyncio.gather(ready_one, free_one, return_exceptions=True)
    assert got == []
    assert list(queue) == ["conn"]  # ready: kept on top
    assert queue.free == 1  # free: counted
    assert queue.waiting == 0


async def test_withdraw_of_a_waiter_cancelled_before_any_hand_off() -> None:
    queue = make_queue()
    got: list[Any] = []
    first = asyncio.create_task(getter(queue, got))
    second = asyncio.create_task(getter(queue, got))
    await settle(2)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    assert queue.waiting == 1
    queue.put("conn", True)
    assert await second == "conn"
    assert queue.waiting == 0


async def test_withdraw_after_a_timeout_or_a_failure_gives_nothing_back() -> None:
    queue = make_queue()
    failed = queue.join(None, monotonic())
    queue.fail_waiters(lambda: RuntimeError("closed"))
    assert queue.withdraw(failed) is None
    assert queue.waiting == 0 and len(queue) == 0 and queue.free == 0
    with pytest.raises(RuntimeError):
        failed.result()


# -- deadlines: one sweep timer for all waiters -----------------------------------------


async def test_deadlines_expire_in_order_each_by_its_own_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sweeps = 0
    sweep = HandoffQueue._sweep

    def counting_sweep(self: HandoffQueue[Any], loop: asyncio.AbstractEventLoop) -> None:
        nonlocal sweeps
        sweeps += 1
        sweep(self, loop)

    monkeypatch.setattr(HandoffQueue, "_sweep", counting_sweep)
    queue = make_queue()
    timeouts = [0.04, 0.01, 0.03, 0.02]  # joined out of deadline order
    ended: dict[float, tuple[int, float]] = {}
    start = monotonic()
    futs = []
    for timeout in timeouts:
        fut = queue.join(timeout, start)
        fut.add_done_callback(
            lambda f, t=timeout: ended.setdefault(t, (sweeps, monotonic() - start))
        )
        futs.append(fut)
    forever = queue.join(None, start)
    await asyncio.wait(futs)
    assert all(isinstance(f.exception(), WaitTimeout) for f in futs)
    for timeout, (_, elapsed) in ended.items():
        assert timeout <= elapsed + 0.001 < timeout + 0.2  # by its own deadline
    # An earlier deadline never expires in a later sweep than a later deadline
    # (a late sweep, on a busy machine, may expire several at once).
    by_deadline = [ended[t][0] for t in sorted(timeouts)]
    assert by_deadline == sorted(by_deadline)
    assert sweeps <= len(timeouts)
    assert queue.waiting == 1  # the waiter without a deadline still waits
    queue.put("conn", True)
    assert forever.result() == "conn"
    assert queue.waiting == 0


async def test_one_timer_for_many_waiters(monkeypatch: pytest.MonkeyPatch) -> None:
    queue = make_queue()
    loop = asyncio.get_running_loop()
    armed: list[float] = []
    call_at = loop.call_at

    def counting_call_at(when: float, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        armed.append(when)
        return call_at(when, *args, **kwargs)

    monkeypatch.setattr(loop, "call_at", counting_call_at)
    now = monotonic()
    futs = [queue.join(1.0, now + i * 1e-4) for i in range(100)]  # equal timeouts
    assert len(armed) == 1  # a later deadline is never the earliest: no timer more
    futs.append(queue.join(0.01, monotonic()))  # an earlier deadline re-arms the one timer
    assert len(armed) == 2
    assert queue._sweeper is not None
    assert abs(queue._sweeper.when() - armed[-1]) < 0.002  # uvloop keeps milliseconds
    assert armed[0] > armed[1]
    with pytest.raises(WaitTimeout):
        await futs[-1]
    assert queue.waiting == 100
    # The sweep re-armed once, for the next deadline (no sooner than SWEEP_INTERVAL).
    assert len(armed) == 3 and armed[2] >= armed[1] + SWEEP_INTERVAL
    queue.fail_waiters(lambda: RuntimeError("done"))
    assert queue._sweeper is None
    assert all(isinstance(f.exception(), RuntimeError) for f in futs[:-1])


async def test_a_waiter_served_before_its_deadline_is_not_timed_out() -> None:
    queue = make_queue()
    fut = queue.join(0.01, monotonic())
    queue.put("conn", True)
    await asyncio.sleep(0.03)
    assert fut.result() == "conn"
    assert queue.waiting == 0


async def test_zero_timeout_expires_at_the_next_sweep() -> None:
    queue = make_queue()
    fut = queue.join(0, monotonic())
    with pytest.raises(WaitTimeout):
        await asyncio.wait_for(fut, 0.2)
    assert queue.waiting == 0


# -- fail_waiters ----------------------------------------------------------------------------


async def test_fail_waiters_wakes_every_waiter_with_its_own_exception() -> None:
    queue = make_queue()
    served = queue.join(None, monotonic())
    queue.put("conn", True)
    futs = [queue.join(t, monotonic()) for t in (None, 5.0, 10.0)]
    outside: concurrent.futures.Future[Any] = concurrent.futures.Future()
    queue.add_waiter(outside)
    assert queue.waiting == 4
    made: list[BaseException] = []

    def make() -> BaseException:
        made.append(RuntimeError("closed"))
        return made[-1]

    queue.fail_waiters(make)
    assert queue.waiting == 0
    assert len(made) == 4 and len({id(e) for e in made}) == 4
    assert [f.exception() for f in futs] == made[:3]
    assert outside.exception() is made[3]
    assert served.result() == "conn"  # done before: untouched
    assert queue._sweeper is None  # the deadline timer is cancelled
    assert len(queue.waiters) == 0


# -- outside waiters (the sync facade's threads) ------------------------------------------


async def test_outside_waiters_are_served_in_line_with_the_others() -> None:
    queue = make_queue()
    inside = queue.join(None, monotonic())
    outside: concurrent.futures.Future[Any] = concurrent.futures.Future()
    queue.add_waiter(outside)
    last = queue.join(None, monotonic())
    assert queue.waiting == 3
    for item in "abc":
        queue.put(item, True)
    assert inside.result() == "a"
    assert outside.result() == "b"
    assert last.result() == "c"
    assert queue.leave(outside) is False  # served: it keeps what it got
    assert queue.waiting == 0


async def test_an_outside_waiter_leaving_unserved() -> None:
    queue = make_queue()
    outside: concurrent.futures.Future[Any] = concurrent.futures.Future()
    queue.add_waiter(outside)
    assert queue.leave(outside) is True  # left with nothing
    assert queue.waiting == 0
    queue.put("conn", True)  # nobody waits: kept
    assert list(queue) == ["conn"]


async def test_an_outside_waiter_failed_keeps_its_exception() -> None:
    queue = make_queue()
    outside: concurrent.futures.Future[Any] = concurrent.futures.Future()
    queue.add_waiter(outside)
    queue.fail_waiters(lambda: RuntimeError("closed"))
    assert queue.leave(outside) is False  # completed: with the exception
    with pytest.raises(RuntimeError, match="closed"):
        outside.result()
    assert queue.waiting == 0


# -- the waiters' futures -----------------------------------------------------------------


class TaggedFuture(asyncio.Future[Any]):
    """A future a loop makes itself (as uvloop, or a loop of an application's, may)."""


class TaggingLoop(asyncio.SelectorEventLoop):
    """An asyncio loop that overrides create_future."""

    def create_future(self) -> asyncio.Future[Any]:
        return TaggedFuture(loop=self)


async def test_a_waiter_awaits_a_future_of_the_running_loop() -> None:
    queue = make_queue()
    loop = asyncio.get_running_loop()
    fut = queue.join(None, monotonic())
    assert fut.get_loop() is loop
    assert isinstance(fut, asyncio.Future)
    queue.put("conn", True)
    assert await fut == "conn"


def test_a_loop_that_makes_its_own_futures_makes_the_waiters_futures() -> None:
    async def waited(queue: HandoffQueue[Any]) -> tuple[type, Any]:
        queue.bind(asyncio.get_running_loop())
        fut = queue.join(1.0, monotonic())
        queue.put("conn", True)
        return type(fut), await fut

    loop = TaggingLoop()
    try:
        assert loop.run_until_complete(waited(HandoffQueue(Free, 0))) == (TaggedFuture, "conn")
    finally:
        loop.close()
    plain = asyncio.new_event_loop()

    def tagged() -> asyncio.Future[Any]:
        return TaggedFuture(loop=plain)

    plain.create_future = tagged  # type: ignore[method-assign]  # on the loop object itself
    try:
        assert plain.run_until_complete(waited(HandoffQueue(Free, 0))) == (TaggedFuture, "conn")
    finally:
        plain.close()
