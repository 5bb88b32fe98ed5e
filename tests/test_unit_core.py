"""Unit tests of :class:`~aiopgpool.core.PoolCore` through the ``Lifecycle`` seam: no server.

A :class:`fakes.FakeLifecycle` makes fake connections, and can make
connecting fail or block, an idle connection die, ``check`` fail, so every
path of checkout, return, resize and closing runs in milliseconds.
"""

from __future__ import annotations

import asyncio
import math
import threading
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from time import monotonic
from typing import Any

import pytest
from fakes import (
    IN_TRANSACTION,
    CheckError,
    ConnectError,
    FakeConn,
    FakeLifecycle,
    make_core,
    opened,
    settle,
    shut,
)

from aiopgpool.core import PoolCore
from aiopgpool.errors import PoolClosed, PoolError, PoolTimeout, TooManyRequests
from aiopgpool.slot import SOCKET_TEST_INTERVAL


async def checkout_all(core: PoolCore[FakeConn], timeout: float = 0.5) -> list[FakeConn]:
    """Borrow ``max_size`` connections (proves that no slot was lost), give them back."""
    conns = [await core.getconn(timeout) for _ in range(core.max_size)]
    assert len({id(c) for c in conns}) == core.max_size
    with pytest.raises(PoolTimeout, match="exhausted"):
        await core.getconn(0)
    for conn in conns:
        await core.putconn(conn)
    return conns


def assert_balanced(core: PoolCore[FakeConn], fake: FakeLifecycle) -> None:
    """The core's books agree with the fake's: open connections, idle + in use, nobody waiting."""
    stats = core.stats()
    assert stats.size == fake.open_now
    assert stats.size == stats.idle + stats.in_use
    assert stats.waiting == 0
    assert core._preparing == 0


# -- the hot path -------------------------------------------------------------------------


async def test_the_most_recently_returned_connection_is_lent_first() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, min_size=3, max_size=3)) as core:
        a, b, c = [await core.getconn() for _ in range(3)]
        for conn in (a, c, b):
            await core.putconn(conn)
        assert await core.getconn() is b
        assert await core.getconn() is c
        assert await core.getconn() is a
        for conn in (a, b, c):
            await core.putconn(conn)
        assert fake.connect_calls == 3
        assert fake.probes == 0  # tested recently, or its socket quiet: no round trip
        assert_balanced(core, fake)


async def test_idle_connections_past_the_test_interval_get_the_quiet_test_only() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, min_size=1, max_size=1)) as core:
        conn = await core.getconn()
        await core.putconn(conn)
        await asyncio.sleep(SOCKET_TEST_INTERVAL * 2)
        assert await core.getconn() is conn
        await core.putconn(conn)
        assert fake.probes == 0


async def test_a_burst_never_opens_more_than_max_size() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, max_size=3, timeout=5.0)) as core:
        held: set[int] = set()
        overlap = 0

        async def borrow(i: int) -> None:
            nonlocal overlap
            conn = await core.getconn()
            assert id(conn) not in held, "one connection lent to two borrowers"
            held.add(id(conn))
            overlap = max(overlap, len(held))
            for _ in range(i % 3):
                await asyncio.sleep(0)
            held.discard(id(conn))
            await core.putconn(conn)

        await asyncio.gather(*(borrow(i) for i in range(50)))
        assert fake.max_open <= 3
        assert overlap == 3
        stats = core.stats()
        assert stats.requests == 50
        assert stats.connections_created == len(fake.created) <= 3
        assert stats.use_time_histogram.count == 50
        assert stats.wait_time_histogram.count == 50
        assert_balanced(core, fake)
        await checkout_all(core)


# -- cancellation --------------------------------------------------------------------------


async def test_cancelled_while_waiting_loses_no_slot() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, max_size=2)) as core:
        held = [await core.getconn(), await core.getconn()]
        waiters = [asyncio.create_task(core.getconn()) for _ in range(3)]
        await settle()
        assert core.stats().waiting == 3
        for task in waiters:
            task.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        assert core.stats().waiting == 0
        for conn in held:
            await core.putconn(conn)
        assert_balanced(core, fake)
        await checkout_all(core)


async def test_a_waiter_cancelled_as_it_is_handed_a_connection_passes_it_on() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, min_size=1, max_size=1)) as core:
        conn = await core.getconn()
        first = asyncio.create_task(core.getconn())
        await settle()
        second = asyncio.create_task(core.getconn())
        await settle()
        await core.putconn(conn)  # hands the connection to the first waiter's future
        first.cancel()  # same tick: the first waiter never sees it
        assert await second is conn
        with pytest.raises(asyncio.CancelledError):
            await first
        await core.putconn(conn)
        assert core.stats().idle == 1
        assert_balanced(core, fake)
        await checkout_all(core)


async def test_cancelled_while_connecting_loses_no_slot() -> None:
    fake = FakeLifecycle()
    fake.gate = asyncio.Event()
    async with opened(make_core(fake, max_size=2)) as core:
        tasks = [asyncio.create_task(core.getconn()) for _ in range(4)]
        await settle()
        assert fake.connecting == 2  # two borrowers connect their slots, two wait in line
        assert core.stats().waiting == 4  # all pending, the connecting ones included
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await settle()
        assert fake.connecting == 0
        stats = core.stats()
        assert (stats.size, stats.in_use, stats.waiting) == (0, 0, 0)
        assert core.queue.free == 2
        fake.gate.set()
        assert_balanced(core, fake)
        await checkout_all(core)
        assert fake.max_open == 2


async def test_cancelled_while_its_idle_connection_is_probed_loses_no_slot() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, min_size=1, max_size=1)) as core:
        conn = await core.getconn()
        await core.putconn(conn)
        conn.quiet = False  # not quiet: a round trip decides
        fake.probe_gate = asyncio.Event()
        await asyncio.sleep(SOCKET_TEST_INTERVAL * 2)
        task = asyncio.create_task(core.getconn())
        await settle()
        assert fake.probes == 1
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        fake.probe_gate.set()
        assert_balanced(core, fake)
        assert core.stats().idle == 1
        conn.quiet = True
        await checkout_all(core)


async def test_cancelled_in_check_loses_no_slot() -> None:
    fake = FakeLifecycle(has_check=True)
    fake.check_gate = asyncio.Event()
    async with opened(make_core(fake, max_size=1)) as core:
        task = asyncio.create_task(core.getconn())
        await settle()
        assert fake.checks == 1
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        fake.check_gate.set()
        assert_balanced(core, fake)
        await checkout_all(core)


# -- timeouts, connect failures, max_waiting ------------------------------------------------


async def test_timeout_zero_when_every_slot_is_out_is_exhausted() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, max_size=2)) as core:
        held = [await core.getconn(0), await core.getconn(0)]
        start = monotonic()
        with pytest.raises(PoolTimeout) as info:
            await core.getconn(0)
        assert str(info.value) == "connection pool exhausted"
        assert monotonic() - start < 0.2
        stats = core.stats()
        assert stats.timeouts == 1 and stats.requests == 3
        for conn in held:
            await core.putconn(conn)
        assert_balanced(core, fake)


async def test_timeout_zero_while_another_borrower_connects_is_exhausted() -> None:
    fake = FakeLifecycle()
    fake.gate = asyncio.Event()
    async with opened(make_core(fake, max_size=1)) as core:
        connecting = asyncio.create_task(core.getconn())
        await settle()
        with pytest.raises(PoolTimeout, match="exhausted"):
            await core.getconn(0)
        fake.gate.set()
        await core.putconn(await connecting)
        assert_balanced(core, fake)


async def test_connect_failing_raises_pool_timeout_at_the_deadline_with_the_cause() -> None:
    fake = FakeLifecycle()
    fake.fail = ConnectError("server down")
    async with opened(make_core(fake, max_size=1, timeout=5.0)) as core:
        start = monotonic()
        connecting = asyncio.create_task(core.getconn(0.3))
        waiting = asyncio.create_task(core.getconn(0.3))  # in line behind the one connecting
        for task in (connecting, waiting):
            with pytest.raises(PoolTimeout) as info:
                await task
            assert 0.3 - 0.01 <= monotonic() - start < 0.3 + 0.2
            assert info.value.__cause__ is fake.fail
        stats = core.stats()
        assert stats.timeouts == 2
        assert stats.connections_failed == fake.connect_calls >= 2
        assert stats.connections_created == 0
        fake.fail = None
        assert_balanced(core, fake)
        await checkout_all(core)


async def test_connect_blocking_raises_pool_timeout_at_the_deadline() -> None:
    fake = FakeLifecycle()
    fake.gate = asyncio.Event()  # never set: a connect that hangs
    async with opened(make_core(fake, max_size=1, timeout=5.0)) as core:
        start = monotonic()
        with pytest.raises(PoolTimeout):
            await core.getconn(0.2)
        assert 0.2 - 0.01 <= monotonic() - start < 0.2 + 0.2
        await settle()
        assert fake.connecting == 0  # the attempt was abandoned, not left running
        fake.gate.set()
        assert_balanced(core, fake)
        await checkout_all(core)


async def test_waiting_in_line_times_out_at_the_deadline() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, max_size=1)) as core:
        conn = await core.getconn()
        start = monotonic()
        with pytest.raises(PoolTimeout) as info:
            await core.getconn(0.1)
        assert 0.1 - 0.01 <= monotonic() - start < 0.1 + 0.2
        assert info.value.__cause__ is None  # connecting works: nothing to chain
        assert core.stats().timeouts == 1
        await core.putconn(conn)
        assert_balanced(core, fake)


async def test_open_wait_chains_the_last_connect_error() -> None:
    fake = FakeLifecycle()
    fake.fail = ConnectError("refused")
    core = make_core(fake, min_size=1, max_size=1)
    try:
        with pytest.raises(PoolTimeout) as info:
            await core.open(wait=True, timeout=0.2)
        assert info.value.__cause__ is fake.fail
    finally:
        await shut(core)


async def test_max_waiting_refuses_requests_beyond_it() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, max_size=1, max_waiting=2)) as core:
        conn = await core.getconn()
        waiters = [asyncio.create_task(core.getconn()) for _ in range(2)]
        await settle()
        with pytest.raises(TooManyRequests):
            await core.getconn()
        assert core.stats().waiting == 2
        await core.putconn(conn)
        for task in waiters:
            await core.putconn(await task)
        assert core.stats().timeouts == 1
        assert_balanced(core, fake)


# -- resize ---------------------------------------------------------------------------------


async def test_growing_hands_the_new_slots_to_the_waiters() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, max_size=1)) as core:
        held = await core.getconn()
        waiters = [asyncio.create_task(core.getconn()) for _ in range(2)]
        await settle()
        assert core.stats().waiting == 2
        await core.maintenance.resize(0, 3)
        got = await asyncio.gather(*waiters)
        assert len({id(c) for c in [held, *got]}) == 3
        assert core.max_size == 3 and core.queue.free == 0
        for conn in [held, *got]:
            await core.putconn(conn)
        assert_balanced(core, fake)
        await checkout_all(core)


async def test_shrinking_drops_free_slots_then_lru_idle_then_borrowed_on_return() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, max_size=5)) as core:
        b1, b2, i1, i2 = [await core.getconn() for _ in range(4)]
        await core.putconn(i1)  # least recently used
        await core.putconn(i2)
        assert core.queue.free == 1
        # 5 -> 3: the free slot goes, then the least recently used idle connection.
        await core.maintenance.resize(0, 3)
        assert core.queue.free == 0
        assert fake.closed == [i1]
        assert list(core.queue) and next(iter(core.queue)).conn is i2
        # 3 -> 1: the last idle connection goes, and one borrowed one when it comes back.
        await core.maintenance.resize(0, 1)
        assert fake.closed == [i1, i2]
        assert core.excess == 1
        await core.putconn(b1)
        assert fake.closed == [i1, i2, b1]
        assert core.excess == 0
        await core.putconn(b2)
        assert not b2.closed
        stats = core.stats()
        assert (stats.size, stats.idle, stats.max_size) == (1, 1, 1)
        assert_balanced(core, fake)
        await checkout_all(core)


async def test_growing_back_cancels_pending_drops() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, max_size=2)) as core:
        a, b = await core.getconn(), await core.getconn()
        await core.maintenance.resize(0, 1)
        assert core.excess == 1
        await core.maintenance.resize(0, 2)
        assert core.excess == 0 and core.queue.free == 0
        await core.putconn(a)
        await core.putconn(b)
        assert not a.closed and not b.closed
        await checkout_all(core)


async def test_resize_refuses_bad_sizes() -> None:
    async with opened(make_core(max_size=2)) as core:
        with pytest.raises(ValueError):
            await core.maintenance.resize(3, 2)
        with pytest.raises(ValueError):
            await core.maintenance.resize(-1)
        with pytest.raises(ValueError):
            await core.maintenance.resize(0, 0)
        assert (core.min_size, core.max_size) == (0, 2)


# -- closing -------------------------------------------------------------------------------


async def test_close_waits_for_borrowed_connections_then_closes() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, min_size=1, max_size=3)) as core:
        idle = await core.getconn()
        first, second = await core.getconn(), await core.getconn()
        await core.putconn(idle)
        blocked = await core.getconn()
        waiter = asyncio.create_task(core.getconn())  # waits: all three are out
        await settle()
        assert core.stats().waiting == 1
        closing = asyncio.create_task(core.closing.close(2.0))
        await settle()
        assert not closing.done()
        assert core.closed and core.state == "closing"
        with pytest.raises(PoolClosed):  # the waiter is failed at once
            await waiter
        with pytest.raises(PoolClosed):  # and newcomers refused
            await core.getconn()
        await core.putconn(first)
        await core.putconn(second)
        await settle()
        assert not closing.done()
        assert not blocked.closed
        await core.putconn(blocked)
        await asyncio.wait_for(closing, 1.0)
        assert core.state == "closed"
        assert all(c.closed for c in (first, second, blocked))
        assert fake.open_now == 0
        await core.closing.close(1.0)  # again: nothing to do


async def test_close_gives_up_waiting_at_its_timeout() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, max_size=1)) as core:
        conn = await core.getconn()
        start = monotonic()
        await core.closing.close(0.1)
        assert 0.1 - 0.01 <= monotonic() - start < 0.1 + 0.2
        assert conn.closed and fake.open_now == 0
        with pytest.raises(PoolClosed):
            await core.putconn(conn)


async def test_closeall_closes_borrowed_connections_and_twice_raises() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, min_size=1, max_size=2)) as core:
        borrowed = await core.getconn()
        idle = await core.getconn()
        await core.putconn(idle)
        waiter_holder = await core.getconn()
        waiter = asyncio.create_task(core.getconn())
        await settle()
        await core.closing.closeall()
        assert borrowed.closed and waiter_holder.closed
        assert fake.open_now == 0
        with pytest.raises(PoolClosed):
            await waiter
        with pytest.raises(PoolClosed):
            await core.closing.closeall()
        with pytest.raises(PoolClosed):
            await core.getconn()
        with pytest.raises(PoolClosed):
            await core.putconn(borrowed)
        assert core.stats().in_use == 0


async def test_a_closed_pool_cannot_be_reopened() -> None:
    core = make_core()
    await core.open()
    await core.closing.close(0)
    with pytest.raises(PoolClosed):
        await core.open()
    await shut(core)


async def test_getconn_before_open_raises_pool_closed() -> None:
    core = make_core()
    with pytest.raises(PoolClosed, match="not open"):
        await core.getconn()
    await shut(core)


# -- validation: dead idle connections, check, dirty returns ---------------------------------


async def test_a_dead_idle_connection_is_replaced() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, min_size=1, max_size=1)) as core:
        dead = await core.getconn()
        await core.putconn(dead)
        dead.quiet = False
        dead.alive = False
        await asyncio.sleep(SOCKET_TEST_INTERVAL * 2)  # past its last test: tested again
        conn = await core.getconn()
        assert conn is not dead
        assert dead.closed and fake.probes == 1
        assert core.stats().connections_lost == 1
        await core.putconn(conn)
        assert_balanced(core, fake)


async def test_a_noisy_but_alive_idle_connection_is_kept_after_a_probe() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, min_size=1, max_size=1)) as core:
        conn = await core.getconn()
        await core.putconn(conn)
        conn.quiet = False
        await asyncio.sleep(SOCKET_TEST_INTERVAL * 2)
        assert await core.getconn() is conn
        assert fake.probes == 1
        await core.putconn(conn)


async def test_dead_idle_connections_are_skipped_for_a_live_one() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, min_size=3, max_size=3)) as core:
        conns = [await core.getconn() for _ in range(3)]
        for conn in conns:
            await core.putconn(conn)
        for conn in conns[1:]:  # the two on top die
            conn.quiet = conn.alive = False
        await asyncio.sleep(SOCKET_TEST_INTERVAL * 2)
        assert await core.getconn() is conns[0]
        assert conns[1].closed and conns[2].closed
        assert core.stats().connections_lost == 2
        await core.putconn(conns[0])
        await settle()
        assert_balanced(core, fake)


async def test_check_runs_on_every_connection_handed_out() -> None:
    fake = FakeLifecycle(has_check=True)
    async with opened(make_core(fake, max_size=1)) as core:
        conn = await core.getconn()  # a fresh one: checked too
        assert fake.checks == 1
        await core.putconn(conn)
        assert await core.getconn() is conn
        assert fake.checks == 2
        await core.putconn(conn)


async def test_check_failing_on_an_idle_connection_replaces_it() -> None:
    fake = FakeLifecycle(has_check=True)
    async with opened(make_core(fake, max_size=1)) as core:
        old = await core.getconn()
        await core.putconn(old)
        fails = 1

        async def check(conn: FakeConn) -> None:
            nonlocal fails
            fake.checks += 1
            if fails:
                fails -= 1
                raise CheckError("stale")

        fake.check = check  # type: ignore[method-assign]
        conn = await core.getconn()
        assert conn is not old and old.closed
        assert core.stats().connections_lost == 1
        await core.putconn(conn)
        assert_balanced(core, fake)


async def test_check_failing_on_fresh_connections_times_out_at_the_deadline() -> None:
    fake = FakeLifecycle(has_check=True)
    fake.check_fails = True
    async with opened(make_core(fake, max_size=1, timeout=5.0)) as core:
        start = monotonic()
        with pytest.raises(PoolTimeout):
            await core.getconn(0.2)
        assert 0.2 - 0.01 <= monotonic() - start < 0.2 + 0.2
        await settle()
        assert fake.open_now == 0  # every connection that failed its check was closed
        assert fake.checks >= 1
        fake.check_fails = False
        assert_balanced(core, fake)
        await checkout_all(core)


async def test_a_dirty_return_is_cleaned_and_counted() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, max_size=1)) as core:
        conn = await core.getconn()
        conn.state = IN_TRANSACTION
        await core.putconn(conn)
        assert fake.cleans == 1
        assert core.stats().returns_bad == 1
        assert await core.getconn() is conn
        await core.putconn(conn)
        assert fake.cleans == 1  # clean now: the hot path


async def test_a_return_that_cannot_be_cleaned_is_discarded() -> None:
    fake = FakeLifecycle()
    fake.clean_ok = False
    async with opened(make_core(fake, max_size=1)) as core:
        conn = await core.getconn()
        conn.state = IN_TRANSACTION
        await core.putconn(conn)
        assert conn.closed
        assert_balanced(core, fake)
        await checkout_all(core)


async def test_reset_runs_on_every_return_and_false_discards() -> None:
    fake = FakeLifecycle(has_reset=True)
    async with opened(make_core(fake, max_size=1)) as core:
        conn = await core.getconn()
        await core.putconn(conn)
        assert fake.resets == 1 and not conn.closed
        fake.reset_ok = False
        assert await core.getconn() is conn
        await core.putconn(conn)
        assert fake.resets == 2 and conn.closed
        assert_balanced(core, fake)


@pytest.mark.parametrize("close", [True, 1], ids=repr)  # any true value, as in psycopg2
async def test_putconn_close_true_discards(close: Any) -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, max_size=1)) as core:
        conn = await core.getconn()
        await core.putconn(conn, close=close)
        assert conn.closed
        assert_balanced(core, fake)
        assert await core.getconn() is not conn


@pytest.mark.parametrize("close", [False, 0, None], ids=repr)
async def test_putconn_close_false_keeps(close: Any) -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, max_size=1)) as core:
        conn = await core.getconn()
        await core.putconn(conn, close=close)
        assert not conn.closed
        assert await core.getconn() is conn


# -- cheap max_size ---------------------------------------------------------------------------


async def test_a_huge_max_size_costs_nothing_until_used() -> None:
    tracemalloc.start()
    try:
        fake = FakeLifecycle()
        core = make_core(fake, min_size=1, max_size=10**9)
        await core.open(wait=True, timeout=2.0)
        conns = [await core.getconn() for _ in range(3)]
        for conn in conns:
            await core.putconn(conn)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    try:
        assert peak < 512 * 1024, f"{peak} bytes for a pool of max_size 10**9"
        assert core.queue.free == 10**9 - 3
        assert core.stats().max_size == 10**9
    finally:
        await shut(core)


# -- argument validation --------------------------------------------------------------------


@pytest.mark.parametrize("idle", [True, False], ids=["idle-available", "none-idle"])
async def test_an_unhashable_key_raises_type_error_and_costs_no_slot(idle: bool) -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, min_size=2 if idle else 0, max_size=2)) as core:
        for _ in range(3):
            with pytest.raises(TypeError):
                await core.getconn(key=["unhashable"])
            with pytest.raises(TypeError):
                await core.getconn(1.0, key={})
        assert core.stats().requests == 0
        assert_balanced(core, fake)
        await checkout_all(core)


BAD_TIMEOUTS = [-1, -0.001, math.nan, "1", True, [1]]


@pytest.mark.parametrize("timeout", BAD_TIMEOUTS, ids=repr)
@pytest.mark.parametrize("idle", [True, False], ids=["idle-available", "none-idle"])
async def test_a_bad_timeout_raises_value_error_on_every_path(timeout: Any, idle: bool) -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, min_size=1 if idle else 0, max_size=1)) as core:
        with pytest.raises(ValueError):
            await core.getconn(timeout)
        with pytest.raises(ValueError):
            await core.getconn(timeout, key="k")
        held = await core.getconn()  # nothing left: the waiting path
        with pytest.raises(ValueError):
            await core.getconn(timeout)
        await core.putconn(held)
        with pytest.raises(ValueError):
            await core.closing.close(timeout)
        assert core.stats().requests == 1
        assert_balanced(core, fake)
        await checkout_all(core)
        await core.closing.close(0)
        with pytest.raises(ValueError):  # validated before the pool's state too
            await core.getconn(timeout)


async def test_a_bad_open_timeout_raises_value_error() -> None:
    core = make_core()
    with pytest.raises(ValueError):
        await core.open(wait=True, timeout=-1)
    await shut(core)


# -- returns the pool does not expect ---------------------------------------------------------


async def test_putconn_of_a_foreign_connection_or_twice_raises_pool_error() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, max_size=1)) as core:
        with pytest.raises(PoolError, match="not borrowed"):
            await core.putconn(FakeConn())
        with pytest.raises(PoolError):
            await core.putconn([])  # type: ignore[arg-type]  # unhashable: not ours either
        conn = await core.getconn()
        await core.putconn(conn)
        with pytest.raises(PoolError, match="not borrowed"):
            await core.putconn(conn)
        stats = core.stats()
        assert stats.use_time_histogram.count == 1  # the refused returns are not counted
        assert stats.idle == 1
        assert_balanced(core, fake)
        await checkout_all(core)


async def test_putconn_with_the_wrong_key_raises_and_keeps_it_borrowed() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, max_size=2)) as core:
        conn = await core.getconn(key="a")
        assert await core.getconn(key="a") is conn  # the same key: the same connection
        assert core.stats().requests == 1
        plain = await core.getconn()
        with pytest.raises(PoolError, match="under key 'a'"):
            await core.putconn(conn, key="b")
        with pytest.raises(PoolError, match="without a key"):
            await core.putconn(plain, key="b")
        assert core.stats().in_use == 2
        assert core.held_by_key("a") is conn
        await core.putconn(conn, key="a")
        await core.putconn(plain)
        assert core.held_by_key("a") is None
        assert_balanced(core, fake)
        await checkout_all(core)


def _in_thread(fn: Any) -> Any:
    """``fn()`` in a new thread, joined: its result, or its exception raised here."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # re-raised below, in the test's thread
            box["exc"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    if "exc" in box:
        raise box["exc"]
    return box.get("result")


@contextmanager
def _waiting_for_one() -> Iterator[
    tuple[asyncio.AbstractEventLoop, PoolCore[FakeConn], FakeConn, asyncio.Task[FakeConn]]
]:
    """A core of one connection, opened on a new loop: the loop, the core, the
    connection, and a task waiting for it. Closes the core, then the loop."""
    loop = asyncio.new_event_loop()
    core = make_core(max_size=1)
    try:
        loop.run_until_complete(core.open(wait=True, timeout=2.0))
        conn = loop.run_until_complete(core.getconn())
        waiter = loop.create_task(core.getconn())
        loop.run_until_complete(asyncio.sleep(0.01))
        assert core.stats().waiting == 1
        yield loop, core, conn, waiter
    finally:
        loop.run_until_complete(shut(core))
        loop.close()


def test_a_return_from_another_threads_loop_raises_where_it_would_wake_a_waiter() -> None:
    with _waiting_for_one() as (loop, core, conn, waiter):
        # A return made on a loop running in another thread would complete the
        # waiter's future there: refused, naming both loops, and nothing lost.
        with pytest.raises(PoolError, match="was opened on event loop"):
            _in_thread(lambda: asyncio.run(core.putconn(conn)))
        assert core.stats().in_use == 1
        loop.run_until_complete(core.putconn(conn))
        assert loop.run_until_complete(waiter) is conn
        loop.run_until_complete(core.putconn(conn))
        # Without waiters the return completes nothing: it is not checked.
        conn = loop.run_until_complete(core.getconn())
        _in_thread(lambda: asyncio.run(core.putconn(conn)))
        assert core.stats().idle == 1


def test_a_pool_follows_its_loop_to_another_thread() -> None:
    with _waiting_for_one() as (loop, core, conn, waiter):

        async def give_back_and_wait() -> Any:
            await core.putconn(conn)  # the first return from this thread checks the loop
            return await waiter

        # The same loop, now run by another thread: returns hand over as before.
        assert _in_thread(lambda: loop.run_until_complete(give_back_and_wait())) is conn
        assert core.loop_thread != threading.get_ident()
        _in_thread(lambda: loop.run_until_complete(core.putconn(conn)))
        assert core.stats().idle == 1


def _on_another_loop(coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``coro_fn()`` on a new event loop of this thread, then close that loop."""
    other = asyncio.new_event_loop()
    try:
        return other.run_until_complete(coro_fn())
    finally:
        other.close()


def test_a_return_on_another_loop_of_the_pools_thread_wakes_the_waiter_on_the_pools() -> None:
    # In the pool's thread, another loop runs only while the pool's does not:
    # the waiter's future completes, and the waiter resumes when its loop runs.
    with _waiting_for_one() as (loop, core, conn, waiter):
        _on_another_loop(lambda: core.putconn(conn))
        assert loop.run_until_complete(waiter) is conn
        loop.run_until_complete(core.putconn(conn))
        assert core.stats().idle == 1


def test_a_wait_on_another_loop_of_the_pools_thread_raises_pool_error() -> None:
    # The wait checks the thread, not the running loop: the other loop's task
    # refuses the pool loop's future, and that becomes the PoolError.
    with _waiting_for_one() as (loop, core, conn, waiter):
        with pytest.raises(PoolError, match="was opened on event loop"):
            _on_another_loop(lambda: core.getconn(timeout=1.0))
        assert core.stats().waiting == 1  # only the waiter of the pool's loop
        loop.run_until_complete(core.putconn(conn))
        assert loop.run_until_complete(waiter) is conn
        loop.run_until_complete(core.putconn(conn))
        assert core.stats().idle == 1
        assert core.stats().in_use == 0


def test_a_wait_after_the_pools_loop_closed_raises_pool_error() -> None:
    loop = asyncio.new_event_loop()
    core = make_core(max_size=1)
    loop.run_until_complete(core.open(wait=True, timeout=2.0))
    conn = loop.run_until_complete(core.getconn())
    loop.close()
    assert conn is not None

    async def wait() -> Any:
        return await core.getconn(timeout=1.0)

    with pytest.raises(PoolError, match="was opened on event loop"):
        asyncio.run(wait())
    assert core.stats().waiting == 0


# -- stats ----------------------------------------------------------------------------------------


async def test_histogram_counts_match_requests_and_returns() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, max_size=2)) as core:
        conns = [await core.getconn(), await core.getconn(key="k")]
        await core.getconn(key="k")  # the key's connection again: not a request
        waiter = asyncio.create_task(core.getconn())
        await settle()
        with pytest.raises(PoolTimeout):
            await core.getconn(0)
        with pytest.raises(PoolTimeout):
            await core.getconn(0.02)
        await core.putconn(conns[0])
        conns[0] = await waiter
        for conn in conns:
            await core.putconn(conn)
        for _ in range(5):
            await core.putconn(await core.getconn())
        stats = core.stats()
        returns = 3 + 5
        requests = 2 + 1 + 2 + 5
        assert stats.requests == requests
        assert stats.use_time_histogram.count == returns
        assert stats.wait_time_histogram.count == requests
        assert stats.requests_waited == 4  # 2 in line, 2 for the connections they opened
        assert stats.timeouts == 2
        assert sum(stats.use_time_histogram.counts) == returns
        assert stats.wait_time_histogram.sum == stats.wait_time_total  # the same figure
        assert stats.connect_time_histogram.count == stats.connections_created == 2
        core.reset_stats()
        stats = core.stats()
        assert (stats.requests, stats.use_time_histogram.count) == (0, 0)
        assert stats.wait_time_histogram.count == 0


async def test_a_connecting_checkout_keeps_the_wait_histogram_monotonic() -> None:
    """A checkout that opens its own connection counts as waiting from the start: the wait
    histogram never shows it as a wait of 0 that later moves to its real bucket (a bucket
    going down is a counter reset to Prometheus), and a pop_stats() meanwhile leaves no
    negative bucket."""
    fake = FakeLifecycle()
    fake.gate = asyncio.Event()
    async with opened(make_core(fake, max_size=2)) as core:
        task = asyncio.create_task(core.getconn())
        await settle()
        during = core.stats()
        assert (during.requests, during.requests_waited, during.waiting) == (1, 1, 1)
        assert during.wait_time_histogram.count == 0
        await asyncio.sleep(0.01)
        fake.gate.set()
        conn = await task
        after = core.stats()
        assert after.wait_time_histogram.count == 1 and after.waiting == 0
        assert all(
            b >= a
            for a, b in zip(
                during.wait_time_histogram.counts, after.wait_time_histogram.counts, strict=True
            )
        )
        fake.gate.clear()
        second = asyncio.create_task(core.getconn())
        await settle()
        core.reset_stats()  # pop_stats() while it connects
        fake.gate.set()
        await core.putconn(await second)
        await core.putconn(conn)
        stats = core.stats()
        assert min(stats.wait_time_histogram.counts) >= 0
        assert stats.requests == 0 and stats.wait_time_histogram.count == 1


# -- more paths: closing mid-connect, cancelled returns, min_size, null -----------------------


async def test_close_while_a_borrower_connects_closes_the_new_connection() -> None:
    fake = FakeLifecycle()
    fake.gate = asyncio.Event()
    async with opened(make_core(fake, max_size=1)) as core:
        task = asyncio.create_task(core.getconn())
        await settle()
        assert fake.connecting == 1
        await core.closing.close(1.0)  # nothing borrowed: closed at once
        fake.gate.set()
        with pytest.raises(PoolClosed):
            await task
        assert len(fake.created) == 1 and fake.created[0].closed
        assert fake.open_now == 0
        assert core.stats().size == 0


async def test_a_return_cancelled_while_cleaning_discards_and_keeps_the_slot() -> None:
    fake = FakeLifecycle()
    fake.clean_gate = asyncio.Event()
    async with opened(make_core(fake, max_size=1)) as core:
        conn = await core.getconn()
        conn.state = IN_TRANSACTION
        returning = asyncio.create_task(core.putconn(conn))
        await settle()
        assert fake.cleans == 1
        returning.cancel()
        with pytest.raises(asyncio.CancelledError):
            await returning
        assert conn.closed  # in an unknown state: not lent again
        fake.clean_gate = None
        assert_balanced(core, fake)
        await checkout_all(core)


async def test_raising_min_size_fills_in_the_background() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, max_size=4)) as core:
        assert core.stats().size == 0
        await core.maintenance.resize(3, 4)
        await core.connector.wait(1.0)
        assert core.stats().size == core.stats().idle == 3
        assert_balanced(core, fake)


async def test_a_lost_connection_is_refilled_to_min_size() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, min_size=2, max_size=2)) as core:
        conn = await core.getconn()
        await core.putconn(conn, close=True)
        await settle()
        assert core.stats().size == 2
        assert fake.connect_calls == 3
        assert_balanced(core, fake)


async def test_a_null_core_closes_every_return_and_bounds_concurrency() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, max_size=2, null=True)) as core:
        a, b = await core.getconn(), await core.getconn()
        waiter = asyncio.create_task(core.getconn())
        await settle()
        assert core.stats().waiting == 1
        await core.putconn(a)
        assert a.closed
        c = await waiter
        assert c is not a and c is not b
        await core.putconn(b)
        await core.putconn(c)
        assert fake.open_now == 0 and fake.max_open == 2
        assert core.stats().idle == 0


async def test_a_null_core_of_max_size_zero_has_no_bound() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, max_size=0, null=True)) as core:
        conns = [await core.getconn(0) for _ in range(20)]
        assert fake.open_now == 20
        for conn in conns:
            await core.putconn(conn)
        assert fake.open_now == 0


# -- bugs these tests found, fixed since (concurrent keys, timeout=0, checks, in transit) --


async def test_concurrent_requests_under_one_key_share_one_connection() -> None:
    fake = FakeLifecycle()
    fake.gate = asyncio.Event()
    async with opened(make_core(fake, max_size=2)) as core:
        first = asyncio.create_task(core.getconn(key="k"))
        second = asyncio.create_task(core.getconn(key="k"))
        await settle()
        fake.gate.set()
        a, b = await first, await second
        assert a is b, "one key, two connections (and two slots)"
        await core.putconn(a, key="k")
        assert_balanced(core, fake)
        await checkout_all(core)


async def test_concurrent_requests_under_one_key_lose_no_slot_when_returned() -> None:
    fake = FakeLifecycle()
    fake.gate = asyncio.Event()
    async with opened(make_core(fake, max_size=2)) as core:
        first = asyncio.create_task(core.getconn(key="k"))
        second = asyncio.create_task(core.getconn(key="k"))
        await settle()
        fake.gate.set()
        got = {id(c): c for c in (await first, await second)}
        for conn in got.values():
            await core.putconn(conn, key="k")
        assert_balanced(core, fake)
        await checkout_all(core)


async def test_timeout_zero_fails_at_once_while_the_refill_cannot_connect() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, min_size=1, max_size=1, timeout=0)) as core:
        conn = await core.getconn()
        fake.fail = ConnectError("server down")
        await core.putconn(conn, close=True)  # the refill starts, and fails
        await settle()
        assert core.stats().connections_failed >= 1
        start = monotonic()
        with pytest.raises(PoolTimeout) as info:
            await asyncio.wait_for(core.getconn(0), 0.5)
        assert monotonic() - start < 0.2
        assert isinstance(info.value.__cause__, ConnectError)


async def test_check_failing_on_fresh_connections_backs_off() -> None:
    fake = FakeLifecycle(has_check=True)
    fake.check_fails = True
    async with opened(make_core(fake, max_size=1, timeout=5.0)) as core:
        with pytest.raises(PoolTimeout):
            await core.getconn(0.2)
        # Connect failures back off from 50 ms, doubling: about 4 attempts in 0.2 s.
        assert fake.connect_calls <= 20


async def test_check_failing_on_fresh_connections_is_chained_to_the_timeout() -> None:
    fake = FakeLifecycle(has_check=True)
    fake.check_fails = True
    async with opened(make_core(fake, max_size=1, timeout=5.0)) as core:
        with pytest.raises(PoolTimeout) as info:
            await core.getconn(0.1)
        assert isinstance(info.value.__cause__, CheckError)


@pytest.mark.parametrize("how", ["close", "closeall"])
async def test_a_connection_in_transit_to_a_cancelled_waiter_is_closed_with_the_pool(
    how: str,
) -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, max_size=1)) as core:
        conn = await core.getconn()
        waiter = asyncio.create_task(core.getconn())
        await settle()
        await core.putconn(conn)  # handed to the waiter's future
        if how == "close":
            await core.closing.close(1.0)
        else:
            await core.closing.closeall()
        waiter.cancel()  # e.g. the application cancels its tasks as it shuts down
        await asyncio.gather(waiter, return_exceptions=True)
        assert conn.closed
        assert fake.open_now == 0
        assert len(core.queue) == 0


async def test_drain_replaces_a_connection_in_transit_to_a_waiter() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, max_size=1)) as core:
        old = await core.getconn()
        waiter = asyncio.create_task(core.getconn())
        await settle()
        await core.putconn(old)  # handed to the waiter's future
        await core.maintenance.drain()
        got = await waiter
        await core.putconn(got)
        assert old.closed, "a connection from before drain() is still in the pool"
        conn = await core.getconn()
        assert conn is not old
        await core.putconn(conn)


# -- maintenance: lifetime, idle expiry, drain, check, leaks, reconnect_failed ---------------


async def test_a_connection_past_max_lifetime_is_closed_on_return() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, max_size=1, max_lifetime=0.02)) as core:
        conn = await core.getconn()
        await asyncio.sleep(0.03)
        await core.putconn(conn)
        assert conn.closed
        assert_balanced(core, fake)


async def test_an_idle_connection_past_max_lifetime_is_replaced_at_checkout() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, max_size=1, max_lifetime=0.02)) as core:
        old = await core.getconn()
        await core.putconn(old)
        await asyncio.sleep(0.03)
        conn = await core.getconn()
        assert conn is not old and old.closed
        await core.putconn(conn)
        assert core.stats().connections_lost == 0  # expired, not lost
        assert_balanced(core, fake)


async def test_idle_expiry_keeps_min_size_and_purge_does_not() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, min_size=1, max_size=3, max_idle=0.02)) as core:
        conns = [await core.getconn() for _ in range(3)]
        for conn in conns:
            await core.putconn(conn)
        await asyncio.sleep(0.03)
        assert core.maintenance.expire_idle(core.max_idle, keep_min=True) == 2
        assert core.stats().size == 1
        await asyncio.sleep(0.03)
        assert await core.maintenance.purge_expired() == 1
        assert all(c.closed for c in conns)
        await core.connector.wait(1.0)  # refilled to min_size with a fresh one
        assert core.stats().size == 1
        assert_balanced(core, fake)
        await checkout_all(core)


async def test_drain_replaces_idle_now_and_borrowed_on_return() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, min_size=2, max_size=2)) as core:
        borrowed = await core.getconn()
        idle = next(iter(core.queue)).conn
        await core.maintenance.drain()
        assert idle.closed and not borrowed.closed
        await core.putconn(borrowed)
        assert borrowed.closed
        await core.connector.wait(1.0)
        assert core.stats().size == 2
        assert_balanced(core, fake)


async def test_check_probes_every_idle_connection_and_replaces_the_dead() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, min_size=3, max_size=3)) as core:
        conns = [slot.conn for slot in core.queue]
        conns[1].alive = False
        await core.maintenance.check()
        assert fake.probes == 3
        assert [c.closed for c in conns] == [False, True, False]
        assert core.stats().connections_lost == 1
        await core.connector.wait(1.0)
        assert core.stats().size == 3
        assert_balanced(core, fake)


async def test_a_connection_held_past_leak_timeout_is_reported() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, max_size=2, leak_timeout=0.02)) as core:
        quick = await core.getconn()
        await core.putconn(quick)
        held = await core.getconn()
        await asyncio.sleep(0.04)
        assert core.stats().leaks == 1
        await core.putconn(held)
        assert core.stats().leaks == 1


async def test_ping_after_idle_probes_a_connection_idle_that_long() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, max_size=1, ping_after_idle=0.02)) as core:
        conn = await core.getconn()
        await core.putconn(conn)
        assert await core.getconn() is conn
        await core.putconn(conn)
        assert fake.probes == 0
        await asyncio.sleep(0.03)
        assert await core.getconn() is conn
        assert fake.probes == 1
        await core.putconn(conn)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_reconnect_failed_is_called_once_when_reconnect_timeout_runs_out(
    kind: str,
) -> None:
    fake = FakeLifecycle()
    fake.fail = ConnectError("down")
    called: list[Any] = []

    def sync_callback(owner: Any) -> None:
        called.append(owner)

    async def async_callback(owner: Any) -> None:
        await asyncio.sleep(0)
        called.append(owner)

    callback = sync_callback if kind == "sync" else async_callback
    core = make_core(
        fake, min_size=1, max_size=1, reconnect_timeout=0.05, reconnect_failed=callback
    )
    async with opened(core, wait=False):
        for _ in range(40):
            if called:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.02)
        assert called == [core]
