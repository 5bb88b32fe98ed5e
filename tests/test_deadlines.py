"""The slow paths' time limits, one timer per loop (aiopgpool.deadlines): a block past its
limit ends, a caller's own cancellation passes through, and a pool that opens leaves no
cancelled timer behind in its user's event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest
from helpers import unique_name

from aiopgpool import AsyncConnectionPool
from aiopgpool.deadlines import move_on_after


@contextmanager
def recorded_timers() -> Iterator[list[Any]]:
    """Every timer armed on the running loop inside the block (asyncio's and anyio's
    timeouts arm theirs with call_at or call_later)."""
    loop = asyncio.get_running_loop()
    timers: list[Any] = []
    seen: set[int] = set()

    def recorder(arm: Any) -> Any:
        def recording(*args: Any, **kwargs: Any) -> Any:
            handle = arm(*args, **kwargs)
            if id(handle) not in seen:  # asyncio's call_later calls call_at
                seen.add(id(handle))
                timers.append(handle)
            return handle

        return recording

    loop.call_at = recorder(loop.call_at)  # type: ignore[method-assign]
    loop.call_later = recorder(loop.call_later)  # type: ignore[method-assign]
    try:
        yield timers
    finally:
        del loop.call_at, loop.call_later  # the instance attributes: the class's methods again


def lingering(timers: list[Any]) -> list[Any]:
    """Cancelled timers asyncio keeps in its heap for another second or more."""
    now = asyncio.get_running_loop().time()
    return [t for t in timers if t.cancelled() and t.when() > now + 1.0]


# -- the limits alone ------------------------------------------------------------------------


async def test_a_block_past_its_limit_ends_there() -> None:
    start = time.monotonic()
    with move_on_after(0.05) as scope:
        await asyncio.sleep(10)
    assert scope.cancelled_caught
    assert time.monotonic() - start < 5


async def test_a_block_within_its_limit_is_not_cancelled() -> None:
    with move_on_after(5) as scope:
        await asyncio.sleep(0.01)
    with move_on_after(None) as endless:
        await asyncio.sleep(0.01)
    assert not scope.cancelled_caught and not scope.cancel_called
    assert not endless.cancelled_caught


async def test_blocks_with_equal_limits_share_one_timer_and_cancel_none() -> None:
    """Twenty blocks of 30 s, ended early: one timer armed, none cancelled."""
    with recorded_timers() as timers:

        async def block() -> None:
            with move_on_after(30):
                await asyncio.sleep(0.01)

        await asyncio.gather(*(block() for _ in range(20)))
    assert len(timers) - 20 == 1  # the twenty sleeps' own timers, and the watchdog's
    assert not lingering(timers)


async def test_each_block_ends_at_its_own_limit() -> None:
    """Limits in any order: the timer re-arms for the next; each block ends at its limit."""
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def block(limit: float) -> float:
        with move_on_after(limit) as scope:
            await asyncio.sleep(10)
        assert scope.cancelled_caught
        return loop.time() - start

    limits = [0.3, 0.1, 0.2, 0.1]
    ended = await asyncio.gather(*(block(limit) for limit in limits))
    for limit, at in zip(limits, ended, strict=True):
        assert limit <= at + 0.01 and at < limit + 2.0, (limits, ended)


async def test_the_callers_own_cancellation_passes_through() -> None:
    entered = asyncio.Event()

    async def block() -> None:
        with move_on_after(30):
            entered.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(block())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with move_on_after(0.05) as scope:  # the loop's watchdog still serves
        await asyncio.sleep(10)
    assert scope.cancelled_caught


def test_each_loop_keeps_its_own_limits() -> None:
    """A timer armed on a loop that ended leaves no later loop's blocks without a limit,
    and loops running at once in two threads each keep their own."""

    async def blocks() -> bool:
        with move_on_after(30):
            await asyncio.sleep(0)
        with move_on_after(0.05) as scope:
            await asyncio.sleep(10)
        return scope.cancelled_caught

    assert asyncio.run(blocks())
    assert asyncio.run(blocks())
    with ThreadPoolExecutor(2) as threads:
        assert all(threads.map(lambda _: asyncio.run(blocks()), range(4)))


# -- in a pool ---------------------------------------------------------------------------------


async def test_opening_a_pool_leaves_no_cancelled_timer_behind(dsn: str) -> None:
    """Ten connects under the 30 s attempt limit, and open(wait=True)'s own limit: no
    cancelled timer stays in the loop's heap (each would slow every timer of the loop)."""
    with recorded_timers() as timers:
        pool = AsyncConnectionPool(dsn, min_size=10, max_size=10, name=unique_name("timers"))
        await pool.open(wait=True)
        try:
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
            assert not lingering(timers), [t.when() for t in lingering(timers)]
        finally:
            await pool.close()
