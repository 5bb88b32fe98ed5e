"""Role tracking through the Lifecycle seam (no server): what the core does when a returned
connection shows that its server is no longer a writable primary."""

from __future__ import annotations

from typing import Any

from fakes import CLEAN, FakeConn, FakeLifecycle, make_core, opened, settle

from aiopgpool.slot import Baseline

FAILED: Baseline = ("inerror",)


class RoleLifecycle(FakeLifecycle):
    """A fake lifecycle that tracks roles; every connection is on ``server``."""

    def __init__(self) -> None:
        super().__init__()
        self.tracks_role = True
        self.server = ("a", "5432")
        self.reported: str | None = None  # what ParameterStatus says of the server
        self.answer: str | None = None  # what asking the server says
        self.asked = 0

    def server_of(self, conn: FakeConn) -> Any:
        return self.server

    def role_lost(self, conn: FakeConn) -> str | None:
        return self.reported

    def in_failed_transaction(self, conn: FakeConn) -> bool:
        return conn.state == FAILED

    async def ask_role(self, conn: FakeConn) -> str | None:
        self.asked += 1
        return self.answer


async def test_a_reported_role_change_replaces_every_connection_to_that_server() -> None:
    fake = RoleLifecycle()
    async with opened(make_core(fake, min_size=3, max_size=3)) as core:
        first, second = await core.getconn(), await core.getconn()
        old = set(fake.created)
        fake.reported = "default_transaction_read_only=on"
        first.state = ("changed",)  # the reported status is part of a tracking pool's state
        await core.putconn(first)
        await settle()
        # the idle one went at once, the returned one too; the borrowed one is marked
        assert first.closed
        assert sum(1 for c in old if c.closed) == 2
        assert not second.closed
        fake.reported = None
        await core.putconn(second)
        await settle()
        assert all(c.closed for c in old)
        assert core.stats().size == 3  # refilled with new connections
        assert fake.asked == 0  # the report was enough: no round trip


async def test_a_failed_transaction_asks_the_server_when_nothing_was_reported() -> None:
    fake = RoleLifecycle()
    async with opened(make_core(fake, min_size=2, max_size=2)) as core:
        conn = await core.getconn()
        other = next(c for c in fake.created if c is not conn)
        conn.state = FAILED  # a refused write (25006) in a transaction, no ParameterStatus
        fake.answer = "pg_is_in_recovery()"
        await core.putconn(conn)
        await settle()
        assert fake.asked == 1
        assert conn.closed and other.closed  # every connection to that server
        assert core.stats().size == 2


async def test_a_failed_transaction_on_a_primary_keeps_the_connection() -> None:
    fake = RoleLifecycle()
    async with opened(make_core(fake, min_size=1, max_size=1)) as core:
        conn = await core.getconn()
        conn.state = FAILED  # an ordinary error: the server is still primary
        await core.putconn(conn)
        await settle()
        assert fake.asked == 1
        assert not conn.closed and conn.state == CLEAN
        assert await core.getconn() is conn


async def test_a_broken_return_tests_the_idle_connections_of_its_server() -> None:
    fake = RoleLifecycle()
    async with opened(make_core(fake, min_size=3, max_size=3)) as core:
        conn = await core.getconn()
        dead, alive = (c for c in fake.created if c is not conn)
        dead.quiet = False  # its socket says the server went away
        conn.alive = False  # returned broken
        conn.state = ("broken",)
        await core.putconn(conn)
        await settle()
        assert conn.closed and dead.closed and not alive.closed
        assert fake.probes == 0  # the socket test, no round trip
        assert core.stats().size == 3
