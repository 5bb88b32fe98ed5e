"""A fake connection and a fake :class:`~aiopgpool.lifecycle.Lifecycle`: the core without a server.

The core touches a connection only through its lifecycle, so these drive
every path of :class:`~aiopgpool.core.PoolCore` (connect failing or
blocking, a dead idle connection, a failing ``check``, dirty returns) in
microseconds, with no PostgreSQL server.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiopgpool.core import PoolCore
from aiopgpool.lifecycle import Lifecycle
from aiopgpool.options import PoolOptions
from aiopgpool.slot import Baseline

#: The state of a clean connection (what ``connect`` gives as the baseline).
CLEAN: Baseline = ("idle",)
#: The state of a connection returned inside a transaction.
IN_TRANSACTION: Baseline = ("intrans",)

_ids = itertools.count(1)


class ConnectError(Exception):
    """What the fake's ``connect`` raises when told to fail."""


class ProbeError(Exception):
    """What the fake's ``probe`` raises for a dead connection."""


class CheckError(Exception):
    """What the fake's ``check`` raises when told to fail."""


class FakeConn:
    """A connection as the core sees it: an identity, a state, and whether it is alive."""

    __slots__ = ("alive", "closed", "id", "quiet", "state")

    def __init__(self) -> None:
        self.id = next(_ids)
        self.state: Baseline = CLEAN
        self.alive = True  # probe() succeeds
        self.quiet = True  # the quiet (socket) test succeeds
        self.closed = False

    def __repr__(self) -> str:
        return f"<FakeConn {self.id}{' closed' if self.closed else ''}>"


class FakeLifecycle(Lifecycle[FakeConn]):
    """A lifecycle of :class:`FakeConn` objects, with knobs to make each step fail or block.

    Knobs (set them at any time):

    * ``fail``: an exception for ``connect`` to raise (None: connect succeeds);
    * ``gate``: an :class:`asyncio.Event` ``connect`` waits for (None: no wait);
    * ``check_fails`` / ``check_gate``: the user's ``check`` raises / waits
      (only called when made with ``has_check=True``);
    * ``probe_gate`` / ``clean_gate``: ``probe`` / ``clean`` wait for it;
    * ``clean_ok`` / ``reset_ok``: what ``clean`` and ``reset`` answer.

    Records: ``created`` (every connection made), ``closed`` (in closing order),
    ``open_now`` / ``max_open`` (connections open now / at most at once),
    ``connect_calls``, ``probes``, ``checks``, ``cleans``, ``resets``.
    """

    def __init__(self, *, has_check: bool = False, has_reset: bool = False) -> None:
        self.has_check = has_check
        self.has_reset = has_reset
        self.state_of: Callable[[FakeConn], Baseline] = _state_of
        self.fail: BaseException | None = None
        self.gate: asyncio.Event | None = None
        self.check_fails = False
        self.check_gate: asyncio.Event | None = None
        self.probe_gate: asyncio.Event | None = None
        self.clean_gate: asyncio.Event | None = None
        self.clean_ok = True
        self.reset_ok = True
        self.created: list[FakeConn] = []
        self.closed: list[FakeConn] = []
        self.open_now = 0
        self.max_open = 0
        self.connect_calls = 0
        self.connecting = 0
        self.probes = 0
        self.checks = 0
        self.cleans = 0
        self.resets = 0

    async def connect(self) -> tuple[FakeConn, Baseline]:
        self.connect_calls += 1
        self.connecting += 1
        try:
            await asyncio.sleep(0)  # a real connect always suspends
            if self.gate is not None:
                await self.gate.wait()
            if self.fail is not None:
                raise self.fail
        finally:
            self.connecting -= 1
        conn = FakeConn()
        self.created.append(conn)
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        return conn, CLEAN

    def close(self, conn: FakeConn) -> None:
        assert not conn.closed, f"{conn!r} closed twice"
        conn.closed = True
        self.closed.append(conn)
        self.open_now -= 1

    def quiet_test(self, conn: FakeConn) -> Callable[[], bool]:
        return lambda: conn.quiet and not conn.closed

    def is_bad_return(self, conn: FakeConn) -> bool:
        return conn.state != CLEAN or not conn.alive

    async def clean(self, conn: FakeConn, baseline: Baseline) -> bool:
        self.cleans += 1
        await asyncio.sleep(0)
        if self.clean_gate is not None:
            await self.clean_gate.wait()
        if not self.clean_ok or not conn.alive:
            return False
        conn.state = baseline
        return True

    async def probe(self, conn: FakeConn) -> None:
        self.probes += 1
        if self.probe_gate is not None:
            await self.probe_gate.wait()
        await asyncio.sleep(0)
        if not conn.alive:
            raise ProbeError(f"{conn!r} is dead")

    async def check(self, conn: FakeConn) -> None:
        self.checks += 1
        if self.check_gate is not None:
            await self.check_gate.wait()
        if self.check_fails:
            raise CheckError("check failed")

    async def reset(self, conn: FakeConn) -> bool:
        self.resets += 1
        return self.reset_ok


def _state_of(conn: FakeConn) -> Baseline:
    return conn.state


def make_core(
    lifecycle: FakeLifecycle | None = None,
    *,
    min_size: int = 0,
    max_size: int = 3,
    timeout: float | None = 1.0,
    **options: Any,
) -> PoolCore[FakeConn]:
    """A core over ``lifecycle`` (a fresh FakeLifecycle if None); not opened yet."""
    options.setdefault("max_idle", None)
    options.setdefault("max_lifetime", None)
    options.setdefault("name", "fake")
    opts = PoolOptions(min_size=min_size, max_size=max_size, timeout=timeout, **options)
    return PoolCore(lifecycle or FakeLifecycle(), opts, "fake target")


async def settle(rounds: int = 10) -> None:
    """Let the loop run ``rounds`` times: every ready callback and task step runs."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def shut(core: PoolCore[Any]) -> None:
    """Close ``core`` at once (if it is not closed yet) and let its background tasks end."""
    if core.state != "closed":
        core.closing.close_now()
    await settle()


@asynccontextmanager
async def opened(core: PoolCore[Any], *, wait: bool = True) -> AsyncIterator[PoolCore[Any]]:
    """``core``, opened (``wait``: with ``min_size`` connections), closed at the end."""
    try:
        await core.open(wait=wait, timeout=2.0)
        yield core
    finally:
        await shut(core)
