"""The drop-ins and config_pool() where a caller gets things a little wrong, or forks.

Regressions: config_pool() in a forked child, psycopg2's ``putconn(conn, close)`` on
PersistentConnectionPool, a bad ``min_kept`` (refused before connecting), and errors that
name the parameter as the caller named it (``minconn``, ``maxconn``, ``max_conn``,
``disable_pooling``), never as the pool underneath does (``min_size``, ``max_size``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import suppress
from typing import Any

import pytest
from helpers import eventually_blocking, query, run_python, unique_name
from psycopg.conninfo import make_conninfo

import aiopgpool
import aiopgpool.psycopg2 as aio2
from aiopgpool import PoolError, config_pool, get_pool


def uname(label: str) -> str:
    return unique_name(f"dm-{label[:36]}")


def loop_threads() -> set[int | None]:
    """The pools' loop threads alive now."""
    return {
        t.ident for t in threading.enumerate() if t.is_alive() and t.name.startswith("aiopgpool-")
    }


@pytest.fixture
def no_default_pool() -> Iterator[None]:
    """No default pool left open by a test of config_pool()."""
    yield
    with suppress(PoolError):
        pool = get_pool()
        if not pool.closed:
            pool.closeall()


# -- config_pool() in a forked child -----------------------------------------------------

CONFIG_FORK_SCRIPT = """
import os, sys, traceback
import aiopgpool

dsn, name = os.environ["AIOPGPOOL_TEST_DSN"], os.environ["AIOPGPOOL_TEST_NAME"]
parent = aiopgpool.config_pool(max_conn=3, dsn=dsn, application_name=name)
conn = parent.getconn()
before = conn.info.backend_pid
parent.putconn(conn)
pid = os.fork()
if pid == 0:
    code = 1
    try:
        child = aiopgpool.config_pool(max_conn=3, dsn=dsn, application_name=name + "-child")
        assert aiopgpool.get_pool() is child
        assert not parent.closed  # left alone: its sockets are the parent's
        with child.connection() as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
        try:
            parent.getconn()
        except aiopgpool.PoolError as exc:  # still refused in the child, clearly
            assert "fork" in str(exc), exc
        else:
            raise AssertionError("the parent's pool served the child")
        child.closeall()
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
assert aiopgpool.get_pool() is parent
conn = parent.getconn()
assert conn.execute("SELECT 1").fetchone() == (1,)
assert conn.info.backend_pid == before  # the same connection, untouched by the child
parent.putconn(conn)
assert parent.stats().connections_lost == 0, parent.stats()
parent.closeall()
print("ok", flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_config_pool_in_a_forked_child_leaves_the_parents_pool_alone(dsn: str) -> None:
    """The child configures its own pool (as README advises): no PoolError, the new pool
    works, the inherited one is neither closed nor usable there, and the parent's
    connection is the same one after the child exited."""
    proc = run_python(
        CONFIG_FORK_SCRIPT,
        timeout=30,
        AIOPGPOOL_TEST_DSN=dsn,
        AIOPGPOOL_TEST_NAME=uname("cfg-fork"),
    )
    assert proc.stdout.strip() == "ok"


def test_config_pool_still_closes_the_previous_pool_in_the_same_process(
    dsn: str, backends: Any, no_default_pool: None
) -> None:
    first_name, second_name = uname("cfg-first"), uname("cfg-second")
    first = config_pool(dsn=make_conninfo(dsn, application_name=first_name))
    assert backends(first_name) == 1
    second = config_pool(dsn=make_conninfo(dsn, application_name=second_name))
    assert first.closed and not second.closed
    assert get_pool() is second
    assert eventually_blocking(lambda: backends(first_name), 0) == 0


# -- PersistentConnectionPool.putconn(conn, close) ---------------------------------------

persistent_classes = pytest.mark.parametrize(
    "cls",
    [aiopgpool.PersistentConnectionPool, aio2.PersistentConnectionPool],
    ids=["aiopgpool", "aiopgpool.psycopg2"],
)


@persistent_classes
def test_persistent_putconn_takes_api_md_positional_arguments(dsn: str, cls: Any) -> None:
    """API.md's ``putconn(conn, key=None, close=False)``, positionally: the key (ignored),
    then ``close``; ``conn`` may be omitted (this thread's connection)."""
    pool = cls(1, 2, dsn, application_name=uname("persist-close"))
    try:
        conn = pool.getconn()
        pool.putconn(conn, "ignored", True)
        assert conn.closed
        again = pool.getconn()
        assert again is not conn
        assert query(again, "SELECT 1") == (1,)
        pool.putconn(None, None, True)  # this thread's connection, closed
        assert again.closed
        assert pool.stats().in_use == 0
    finally:
        pool.closeall()


@persistent_classes
def test_persistent_putconn_still_takes_key_by_keyword(dsn: str, cls: Any) -> None:
    """API.md's ``putconn(conn, key=None, close=False)``: ``key=`` is accepted (and ignored:
    the thread is the key), ``close=`` by keyword too."""
    pool = cls(1, 2, dsn, application_name=uname("persist-key"))
    try:
        conn = pool.getconn()
        pool.putconn(conn, key="ignored")
        assert not conn.closed
        assert pool.getconn() is conn  # pooled, not discarded
        pool.putconn(conn, key="ignored", close=True)
        assert conn.closed
        assert pool.stats().in_use == 0
    finally:
        pool.closeall()


# -- min_kept ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("min_kept", "message"),
    [
        (5, r"min_kept \(5\) must not be greater than maxconn \(4\)"),
        (-1, "min_kept must be >= 0, got -1"),
        ("2", "min_kept must be an integer, got '2'"),
        (True, "min_kept must be an integer, got True"),
    ],
)
def test_a_bad_min_kept_is_refused_before_connecting(
    dsn: str, backends: Any, min_kept: Any, message: str
) -> None:
    name = uname("minkept-bad")
    before = loop_threads()
    with pytest.raises(ValueError, match=message):
        aiopgpool.SimpleConnectionPool(3, 4, dsn, min_kept=min_kept, application_name=name)
    assert backends(name) == 0
    assert loop_threads() - before == set()


def test_a_failure_after_open_closes_the_pool(
    dsn: str, backends: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever fails in the constructor once ``minconn`` are open, they are closed and the
    loop thread ends (nobody holds the pool to close it)."""

    def failing_resize(self: Any, min_size: int, max_size: int | None = None) -> None:
        raise RuntimeError("resize failed")

    monkeypatch.setattr(aiopgpool.sync_pool.SyncPoolFacade, "resize", failing_resize)
    name = uname("minkept-fail")
    before = loop_threads()
    with pytest.raises(RuntimeError, match="resize failed") as info:
        aiopgpool.SimpleConnectionPool(3, 4, dsn, min_kept=1, application_name=name)
    # The traceback keeps the half-built pool alive: closed by the constructor, not by
    # garbage collection.
    assert info.traceback is not None
    assert eventually_blocking(lambda: backends(name), 0) == 0
    assert eventually_blocking(lambda: loop_threads() - before, set()) == set()
    del info


def test_a_good_min_kept_is_still_taken(dsn: str, backends: Any) -> None:
    name = uname("minkept-ok")
    pool = aiopgpool.SimpleConnectionPool(2, 4, dsn, min_kept=1, application_name=name)
    try:
        assert backends(name) == 2  # minconn at construction
        assert pool.stats().min_size == 1
    finally:
        pool.closeall()


# -- errors name the caller's parameters -------------------------------------------------

BAD_ARGUMENTS: list[tuple[str, Callable[[str], Any], str]] = [
    (
        "minconn>maxconn",
        lambda dsn: aiopgpool.SimpleConnectionPool(5, 2, dsn),
        r"minconn \(5\) must not be greater than maxconn \(2\)",
    ),
    ("maxconn=0", lambda dsn: aiopgpool.SimpleConnectionPool(1, 0, dsn), "maxconn must be >= 1"),
    (
        "maxconn=-1",
        lambda dsn: aiopgpool.ThreadedConnectionPool(0, -1, dsn),
        "maxconn must be >= 1",
    ),
    (
        "minconn='1'",
        lambda dsn: aiopgpool.SimpleConnectionPool("1", 2, dsn),
        "minconn must be an integer, got '1'",
    ),
    (
        "minconn=-1",
        lambda dsn: aio2.ThreadedConnectionPool(-1, 2, dsn),
        "minconn must be >= 0, got -1",
    ),
    (
        "maxconn=2.5",
        lambda dsn: aio2.SimpleConnectionPool(1, 2.5, dsn),
        "maxconn must be an integer, got 2.5",
    ),
    (
        "disable_pooling='yes'",
        lambda dsn: aiopgpool.SimpleConnectionPool(1, 2, dsn, disable_pooling="yes"),
        "disable_pooling must be True or False",
    ),
    ("max_conn=0", lambda dsn: config_pool(max_conn=0, dsn=dsn), "max_conn must be >= 1, got 0"),
    (
        "max_conn=2.5",
        lambda dsn: config_pool(max_conn=2.5, dsn=dsn),
        "max_conn must be an integer, got 2.5",
    ),
    (
        "max_conn=True",
        lambda dsn: config_pool(max_conn=True, dsn=dsn),
        "max_conn must be an integer, got True",
    ),
    (
        "config disable_pooling='yes'",
        lambda dsn: config_pool(disable_pooling="yes", dsn=dsn),
        "disable_pooling must be True or False",
    ),
    (
        "config disable_pooling=2",
        lambda dsn: config_pool(disable_pooling=2, dsn=dsn),
        "disable_pooling must be True or False",
    ),
]


@pytest.mark.parametrize(
    ("make", "message"), [case[1:] for case in BAD_ARGUMENTS], ids=[c[0] for c in BAD_ARGUMENTS]
)
def test_errors_name_the_callers_parameter(
    dsn: str, no_default_pool: None, make: Callable[[str], Any], message: str
) -> None:
    """ValueError naming the parameter as the caller passed it; config_pool() keeps the
    default pool it had; nothing connects."""
    default = config_pool(dsn=dsn)
    before = loop_threads()
    with pytest.raises(ValueError, match=message) as info:
        make(dsn)
    assert "min_size" not in str(info.value) and "max_size" not in str(info.value)
    assert get_pool() is default and not default.closed
    assert loop_threads() - before == set()


@pytest.mark.parametrize("flag", [0, 1, False, True], ids=repr)
def test_disable_pooling_takes_psycopg2_era_zero_and_one(
    dsn: str, backends: Any, no_default_pool: None, flag: Any
) -> None:
    """0 and 1 are False and True, for config_pool() and the drop-ins alike."""
    name = uname("disable-flag")
    for pool in (
        config_pool(
            max_conn=2, disable_pooling=flag, dsn=make_conninfo(dsn, application_name=name)
        ),
        aiopgpool.SimpleConnectionPool(1, 2, dsn, disable_pooling=flag, application_name=name),
    ):
        try:
            conn = pool.getconn()
            assert query(conn, "SELECT 1") == (1,)
            pool.putconn(conn)
            assert conn.closed == bool(flag)  # a null pool closes on return
        finally:
            pool.closeall()
    assert eventually_blocking(lambda: backends(name), 0) == 0
