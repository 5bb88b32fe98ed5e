"""psycopg2.pool drop-ins: the top-level classes (psycopg 3 connections) and
aiopgpool.psycopg2 (real psycopg2 connections).

The semantic tests run on the real psycopg2.pool classes too, so that any
divergence from the behaviour legacy code relies on shows up as a failure.
"""

from __future__ import annotations

import inspect
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import psycopg
import psycopg2
import psycopg2.extensions
import psycopg2.pool
import pytest
from helpers import eventually_blocking, query, run_python, unique_name

import aiopgpool
import aiopgpool.psycopg2 as aio2

_seq = itertools.count(1)


def uname(label: str) -> str:
    return unique_name(f"di-{label[:36]}")


def in_transaction(conn: Any) -> bool:
    if isinstance(conn, psycopg.Connection):
        return conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
    return conn.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE


@dataclass(frozen=True)
class Impl:
    label: str
    abstract: type
    simple: type
    threaded: type
    persistent: type | None
    error: type[Exception]
    conn_type: type
    connect: Callable[..., Any]
    ours: bool

    def __str__(self) -> str:
        return self.label


REAL = Impl(
    "psycopg2.pool",
    psycopg2.pool.AbstractConnectionPool,
    psycopg2.pool.SimpleConnectionPool,
    psycopg2.pool.ThreadedConnectionPool,
    getattr(psycopg2.pool, "PersistentConnectionPool", None),
    psycopg2.pool.PoolError,
    psycopg2.extensions.connection,
    psycopg2.connect,
    ours=False,
)
OURS_PSYCOPG2 = Impl(
    "aiopgpool.psycopg2",
    aio2.AbstractConnectionPool,
    aio2.SimpleConnectionPool,
    aio2.ThreadedConnectionPool,
    aio2.PersistentConnectionPool,
    psycopg2.pool.PoolError,  # aio2.PoolError: an aiopgpool.PoolError too
    psycopg2.extensions.connection,
    psycopg2.connect,
    ours=True,
)
OURS = Impl(
    "aiopgpool",
    aiopgpool.AbstractConnectionPool,
    aiopgpool.SimpleConnectionPool,
    aiopgpool.ThreadedConnectionPool,
    aiopgpool.PersistentConnectionPool,
    aiopgpool.PoolError,
    psycopg.Connection,
    psycopg.connect,
    ours=True,
)
ALL = [REAL, OURS_PSYCOPG2, OURS]
MINE = [OURS_PSYCOPG2, OURS]

all_impls = pytest.mark.parametrize("impl", ALL, ids=str)
our_impls = pytest.mark.parametrize("impl", MINE, ids=str)
kinds = pytest.mark.parametrize("kind", ["simple", "threaded"])


class Maker:
    """Builds pools with a unique application_name; closes them all at teardown."""

    def __init__(self) -> None:
        self.made: list[Any] = []

    def __call__(self, cls: type, minconn: int, maxconn: int, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("application_name", uname(cls.__name__))
        pool = cls(minconn, maxconn, *args, **kwargs)
        pool.app_name = kwargs["application_name"]
        self.made.append(pool)
        return pool

    def close(self) -> None:
        for pool in self.made:
            if not pool.closed:
                with suppress(Exception):
                    pool.closeall()


@pytest.fixture
def make() -> Iterator[Maker]:
    maker = Maker()
    yield maker
    maker.close()


@pytest.fixture(scope="module")
def dbname(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT current_database()").fetchone()
        assert row is not None
        return str(row[0])


@pytest.fixture
def table(dsn: str) -> Iterator[str]:
    name = f"di_t_{os.getpid()}_{next(_seq)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (x int)")
    yield name
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")


def rows(dsn: str, tname: str) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [r[0] for r in conn.execute(f"SELECT x FROM {tname} ORDER BY x").fetchall()]


def cls_of(impl: Impl, kind: str) -> type:
    return impl.simple if kind == "simple" else impl.threaded


# -- the same semantics as psycopg2.pool ------------------------------------------------


@all_impls
def test_class_hierarchy_and_signature(impl: Impl) -> None:
    for cls in (impl.simple, impl.threaded):
        assert issubclass(cls, impl.abstract)
        params = list(inspect.signature(cls.__init__).parameters.values())
        assert [p.name for p in params[:3]] == ["self", "minconn", "maxconn"]
        kinds_ = {p.kind for p in params[3:]}
        assert inspect.Parameter.VAR_POSITIONAL in kinds_
        assert inspect.Parameter.VAR_KEYWORD in kinds_


@all_impls
@kinds
def test_dsn_as_first_positional_argument(dsn: str, make: Maker, impl: Impl, kind: str) -> None:
    pool = make(cls_of(impl, kind), 1, 2, dsn)
    conn = pool.getconn()
    assert isinstance(conn, impl.conn_type)
    assert query(conn, "SELECT current_setting('application_name')") == (pool.app_name,)
    pool.putconn(conn)


@all_impls
def test_keyword_parameters(dsn: str, dbname: str, make: Maker, impl: Impl) -> None:
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    params["dbname"] = dbname
    pool = make(impl.threaded, 1, 2, **params)
    conn = pool.getconn()
    assert query(conn, "SELECT current_database()") == (dbname,)
    pool.putconn(conn)


@all_impls
def test_database_is_accepted_for_dbname(dsn: str, dbname: str, make: Maker, impl: Impl) -> None:
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    params.pop("dbname", None)
    params["database"] = dbname
    pool = make(impl.threaded, 1, 2, **params)
    conn = pool.getconn()
    assert query(conn, "SELECT current_database()") == (dbname,)
    pool.putconn(conn)
    # ... with a dsn too: the keyword wins over nothing, and names the database.
    pool2 = make(impl.simple, 0, 1, dsn, database=dbname)
    conn = pool2.getconn()
    assert query(conn, "SELECT current_database()") == (dbname,)
    pool2.putconn(conn)


@all_impls
@kinds
def test_attributes(dsn: str, make: Maker, impl: Impl, kind: str) -> None:
    pool = make(cls_of(impl, kind), 1, 3, dsn)
    assert (pool.minconn, pool.maxconn, pool.closed) == (1, 3, False)
    assert isinstance(pool, impl.abstract)
    pool.closeall()
    assert pool.closed is True


@all_impls
@kinds
def test_minconn_connections_at_construction(
    dsn: str, make: Maker, impl: Impl, kind: str, backends: Any
) -> None:
    pool = make(cls_of(impl, kind), 2, 4, dsn)
    assert backends(pool.app_name) == 2
    pool0 = make(cls_of(impl, kind), 0, 4, dsn)
    assert backends(pool0.app_name) == 0


@all_impls
@kinds
def test_exhausted_at_once(dsn: str, make: Maker, impl: Impl, kind: str, backends: Any) -> None:
    pool = make(cls_of(impl, kind), 1, 2, dsn)
    held = [pool.getconn(), pool.getconn()]
    assert held[0] is not held[1]
    start = time.monotonic()
    with pytest.raises(impl.error, match="connection pool exhausted"):
        pool.getconn()
    assert time.monotonic() - start < 0.5
    assert backends(pool.app_name) == 2
    pool.putconn(held.pop())
    held.append(pool.getconn())  # a slot is free again
    for conn in held:
        pool.putconn(conn)


@all_impls
def test_putconn_without_conn_or_key_raises(dsn: str, make: Maker, impl: Impl) -> None:
    pool = make(impl.threaded, 1, 2, dsn)
    with pytest.raises(impl.error):
        pool.putconn()
    with pytest.raises(impl.error):
        pool.putconn(None)


@all_impls
@kinds
def test_putconn_of_a_foreign_connection_raises(
    dsn: str, make: Maker, impl: Impl, kind: str
) -> None:
    pool = make(cls_of(impl, kind), 1, 2, dsn)
    stranger = impl.connect(dsn)
    try:
        with pytest.raises(impl.error):
            pool.putconn(stranger)
    finally:
        stranger.close()
    other = make(cls_of(impl, kind), 1, 2, dsn)
    theirs = other.getconn()
    with pytest.raises(impl.error):
        pool.putconn(theirs)
    other.putconn(theirs)


@all_impls
@kinds
def test_double_putconn_raises(dsn: str, make: Maker, impl: Impl, kind: str) -> None:
    pool = make(cls_of(impl, kind), 1, 2, dsn)
    conn = pool.getconn()
    pool.putconn(conn)
    with pytest.raises(impl.error):
        pool.putconn(conn)


@all_impls
def test_double_putconn_raises_while_a_keyed_connection_is_held(
    dsn: str, make: Maker, impl: Impl
) -> None:
    pool = make(impl.threaded, 1, 3, dsn)
    keyed = pool.getconn("session")
    for _ in range(200):
        conn = pool.getconn()
        pool.putconn(conn)
        with pytest.raises(impl.error):
            pool.putconn(conn)
    pool.putconn(keyed, key="session")


@all_impls
@kinds
def test_use_after_closeall_raises(dsn: str, make: Maker, impl: Impl, kind: str) -> None:
    pool = make(cls_of(impl, kind), 1, 2, dsn)
    borrowed = pool.getconn()
    pool.closeall()
    assert pool.closed
    assert borrowed.closed  # borrowed connections are closed too
    with pytest.raises(impl.error):
        pool.getconn()
    with pytest.raises(impl.error):
        pool.putconn(borrowed)
    with pytest.raises(impl.error):
        pool.closeall()


@all_impls
@kinds
def test_closeall_closes_every_backend(
    dsn: str, make: Maker, impl: Impl, kind: str, backends: Any
) -> None:
    pool = make(cls_of(impl, kind), 2, 3, dsn)
    held = [pool.getconn() for _ in range(3)]
    pool.putconn(held[0])
    assert backends(pool.app_name) >= 2
    pool.closeall()
    assert all(c.closed for c in held)
    assert eventually_blocking(lambda: backends(pool.app_name), 0) == 0


@all_impls
@kinds
def test_keyed_getconn_returns_the_same_connection(
    dsn: str, make: Maker, impl: Impl, kind: str
) -> None:
    pool = make(cls_of(impl, kind), 1, 1, dsn)
    first = pool.getconn("k")
    assert pool.getconn("k") is first  # no second slot needed (maxconn=1)
    with pytest.raises(impl.error, match="exhausted"):
        pool.getconn("other")
    pool.putconn(first, key="k")
    other = pool.getconn("other")
    pool.putconn(other, "other")


@all_impls
def test_keyed_connection_put_back_without_its_key(dsn: str, make: Maker, impl: Impl) -> None:
    """putconn(conn) finds the key itself; the key is free at once and nothing is shared."""
    pool = make(impl.threaded, 2, 2, dsn)
    for _ in range(50):
        first = pool.getconn("k")
        pool.putconn(first)  # no key given
        again = pool.getconn("k")
        time.sleep(0.002)
        other = pool.getconn()  # the second slot: must not be `again`
        try:
            assert other is not again, "one connection handed to two borrowers"
            with pytest.raises(impl.error, match="exhausted"):
                pool.getconn()
        finally:
            pool.putconn(other)
        pool.putconn(again, key="k")


@all_impls
@kinds
@pytest.mark.parametrize("close", [True, 1], ids=repr)  # any true value, as psycopg2's
def test_putconn_close_discards(dsn: str, make: Maker, impl: Impl, kind: str, close: Any) -> None:
    pool = make(cls_of(impl, kind), 1, 1, dsn)
    conn = pool.getconn()
    pool.putconn(conn, close=close)
    assert conn.closed
    again = pool.getconn()
    assert again is not conn
    assert query(again, "SELECT 1") == (1,)
    pool.putconn(again)


@all_impls
@kinds
def test_putconn_of_a_connection_the_borrower_closed(
    dsn: str, make: Maker, impl: Impl, kind: str
) -> None:
    pool = make(cls_of(impl, kind), 1, 2, dsn)
    conn = pool.getconn()
    conn.close()
    pool.putconn(conn)
    again = pool.getconn()
    assert again is not conn
    assert query(again, "SELECT 1") == (1,)
    pool.putconn(again)


@all_impls
@pytest.mark.parametrize("state", ["intrans", "inerror"])
def test_returned_in_transaction_is_rolled_back(
    dsn: str, make: Maker, impl: Impl, table: str, state: str
) -> None:
    pool = make(impl.threaded, 1, 1, dsn)
    conn = pool.getconn()
    with conn.cursor() as cur:
        cur.execute(f"INSERT INTO {table} VALUES (1)")
        if state == "inerror":
            with pytest.raises(Exception, match="division by zero"):
                cur.execute("SELECT 1 / 0")
    pool.putconn(conn)
    again = pool.getconn()
    assert again is conn
    assert not in_transaction(again)
    assert query(again, "SELECT 1") == (1,)
    again.rollback()
    pool.putconn(again)
    assert rows(dsn, table) == []


@all_impls
def test_threaded_pool_from_many_threads(dsn: str, make: Maker, impl: Impl) -> None:
    pool = make(impl.threaded, 1, 4, dsn)
    errors: list[BaseException] = []
    lock = threading.Lock()
    holders: dict[int, int] = {}
    overlaps: list[int] = []

    def worker(t: int) -> None:
        try:
            for i in range(100):
                conn = pool.getconn()
                with lock:
                    if id(conn) in holders:
                        overlaps.append(t)
                    holders[id(conn)] = t
                if i % 3 == 0:
                    query(conn, "SELECT 1")
                with lock:
                    del holders[id(conn)]
                pool.putconn(conn)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30.0)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert overlaps == []


# -- beyond psycopg2.pool (ours only) ----------------------------------------------------


@our_impls
def test_putconn_by_key_without_the_connection(dsn: str, make: Maker, impl: Impl) -> None:
    pool = make(impl.threaded, 1, 1, dsn)
    conn = pool.getconn("k")
    pool.putconn(key="k")
    assert pool.stats().in_use == 0
    again = pool.getconn()  # the only slot is free again
    assert again is conn
    pool.putconn(again)
    with pytest.raises(impl.error):
        pool.putconn(key="not-held")


@our_impls
@kinds
def test_connection_context_manager(
    dsn: str, make: Maker, impl: Impl, kind: str, table: str
) -> None:
    pool = make(cls_of(impl, kind), 1, 1, dsn)
    with pool.connection() as conn:
        assert isinstance(conn, impl.conn_type)
        with conn.cursor() as cur:
            cur.execute(f"INSERT INTO {table} VALUES (1)")
    assert rows(dsn, table) == [1]  # committed
    with pytest.raises(ZeroDivisionError), pool.connection() as conn:
        with conn.cursor() as cur:
            cur.execute(f"INSERT INTO {table} VALUES (2)")
        1 / 0  # noqa: B018
    assert rows(dsn, table) == [1]  # rolled back
    held = pool.getconn()
    with pytest.raises(impl.error, match="connection pool exhausted"), pool.connection():
        pass
    pool.putconn(held)
    with pool.connection() as conn:
        assert conn is held
    assert pool.stats().in_use == 0


@our_impls
@pytest.mark.parametrize("sizes", [(3, 2), (-1, 2), (0, 0), (1, -1)])
def test_bad_sizes_raise_value_error(
    dsn: str, impl: Impl, sizes: tuple[int, int], backends: Any
) -> None:
    name = uname("bad-sizes")
    for cls in (impl.simple, impl.threaded, impl.persistent):
        with pytest.raises(ValueError):
            cls(*sizes, dsn, application_name=name)
    assert backends(name) == 0


@our_impls
def test_abstract_connection_pool_is_usable(dsn: str, make: Maker, impl: Impl) -> None:
    pool = make(impl.abstract, 1, 2, dsn)
    with pool.connection() as conn:
        assert query(conn, "SELECT 1") == (1,)


@our_impls
def test_persistent_pool_keys_by_thread(dsn: str, make: Maker, impl: Impl) -> None:
    assert impl.persistent is not None
    pool = make(impl.persistent, 1, 2, dsn)
    mine = pool.getconn()
    assert pool.getconn() is mine
    assert pool.getconn("ignored key") is mine
    theirs: list[Any] = []

    def other_thread() -> None:
        conn = pool.getconn()
        theirs.append(conn)
        theirs.append(pool.getconn())
        pool.putconn()  # conn omitted

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join(10.0)
    assert len(theirs) == 2
    assert theirs[0] is theirs[1]
    assert theirs[0] is not mine
    assert pool.stats().in_use == 1
    pool.putconn()  # conn omitted: this thread's
    assert pool.stats().in_use == 0
    with pytest.raises(impl.error):
        pool.putconn()  # holds none now
    again = pool.getconn()
    assert query(again, "SELECT 1") == (1,)
    pool.putconn(again)


@our_impls
def test_persistent_pool_exhausted_across_threads(dsn: str, make: Maker, impl: Impl) -> None:
    assert impl.persistent is not None
    pool = make(impl.persistent, 1, 2, dsn)
    got: list[Any] = []
    release = threading.Event()

    def holder() -> None:
        try:
            got.append(pool.getconn())
            release.wait(10.0)
        except BaseException as exc:
            got.append(exc)
        finally:
            with suppress(Exception):
                pool.putconn()

    threads = [threading.Thread(target=holder) for _ in range(2)]
    for thread in threads:
        thread.start()
    assert eventually_blocking(lambda: len(got), 2) == 2
    try:
        assert all(isinstance(c, impl.conn_type) for c in got), got
        with pytest.raises(impl.error, match="connection pool exhausted"):
            pool.getconn()
    finally:
        release.set()
        for thread in threads:
            thread.join(10.0)
    assert pool.stats().in_use == 0
    pool.putconn(pool.getconn())


@our_impls
def test_idle_connection_killed_by_the_server_is_not_handed_out(
    dsn: str, make: Maker, impl: Impl, terminate: Any, backends: Any
) -> None:
    pool = make(impl.threaded, 2, 2, dsn)
    terminate(pool.app_name)
    assert eventually_blocking(lambda: backends(pool.app_name), 0) == 0
    for _ in range(3):
        a, b = pool.getconn(), pool.getconn()
        assert query(a, "SELECT 1") == query(b, "SELECT 1") == (1,)
        pool.putconn(a)
        pool.putconn(b)


@our_impls
def test_no_password_in_repr_or_errors(dsn: str, make: Maker, impl: Impl) -> None:
    secret = "s3cr3t-Dr0p-ins"
    pool = make(impl.threaded, 1, 1, dsn, password=secret)
    held = pool.getconn()
    with pytest.raises(impl.error) as info:
        pool.getconn()
    texts = [repr(pool), str(pool), str(info.value), repr(info.value)]
    pool.putconn(held)
    pool.closeall()
    with pytest.raises(impl.error) as info:
        pool.getconn()
    texts += [repr(pool), str(info.value)]
    assert not [t for t in texts if secret in t]


# -- aiopgpool.psycopg2: real psycopg2 connections ------------------------------------


def test_psycopg2_classes_serve_real_psycopg2_connections(dsn: str, make: Maker) -> None:
    for cls in (aio2.SimpleConnectionPool, aio2.ThreadedConnectionPool):
        pool = make(cls, 1, 2, dsn)
        conn = pool.getconn()
        assert type(conn) is psycopg2.extensions.connection
        with conn.cursor() as cur:
            cur.execute("SELECT %s::int + 1", (41,))
            assert cur.fetchone() == (42,)
        pool.putconn(conn)
    persistent = make(aio2.PersistentConnectionPool, 1, 2, dsn)
    assert type(persistent.getconn()) is psycopg2.extensions.connection
    persistent.putconn()


def test_psycopg2_attributes_are_restored(dsn: str, make: Maker) -> None:
    pool = make(aio2.ThreadedConnectionPool, 1, 1, dsn)
    conn = pool.getconn()
    baseline = (conn.autocommit, conn.isolation_level, conn.readonly, conn.deferrable)
    conn.autocommit = True
    conn.set_session(
        isolation_level=psycopg2.extensions.ISOLATION_LEVEL_SERIALIZABLE,
        readonly=True,
        deferrable=True,
    )
    pool.putconn(conn)
    again = pool.getconn()
    assert again is conn
    assert (again.autocommit, again.isolation_level, again.readonly, again.deferrable) == (baseline)
    assert query(again, "SHOW transaction_read_only") == ("off",)
    assert query(again, "SHOW transaction_isolation") == ("read committed",)
    again.rollback()
    pool.putconn(again)


def test_psycopg2_in_error_is_rolled_back_through_psycopg2(dsn: str, make: Maker) -> None:
    pool = make(aio2.ThreadedConnectionPool, 1, 1, dsn)
    conn = pool.getconn()
    with conn.cursor() as cur, pytest.raises(psycopg2.errors.DivisionByZero):
        cur.execute("SELECT 1 / 0")
    assert conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_INERROR
    pool.putconn(conn)
    again = pool.getconn()
    assert again is conn
    assert again.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    assert again.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    pool.putconn(again)


PSYCOPG2_FORK_SCRIPT = """
import gc, os, sys, time
import aiopgpool
from aiopgpool.psycopg2 import ThreadedConnectionPool

pool = ThreadedConnectionPool(2, 2, os.environ["AIOPGPOOL_TEST_DSN"],
                              application_name=os.environ["AIOPGPOOL_TEST_NAME"])
conns = [pool.getconn(), pool.getconn()]
before = {c.info.backend_pid for c in conns}
for c in conns:
    pool.putconn(c)
del conns, c
pid = os.fork()
if pid == 0:
    try:
        pool.getconn()
    except aiopgpool.PoolError as exc:
        assert "fork" in str(exc), exc
    else:
        sys.exit(3)
    del pool
    gc.collect()
    sys.exit(0)  # a normal exit: atexit handlers and finalizers run
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
time.sleep(0.3)
conns = [pool.getconn(), pool.getconn()]
for c in conns:
    with c.cursor() as cur:
        cur.execute("SELECT 1")
after = {c.info.backend_pid for c in conns}
assert after == before, (before, after)
for c in conns:
    pool.putconn(c)
pool.closeall()
print("ok", flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_psycopg2_pool_survives_a_forked_child_exiting(dsn: str) -> None:
    """psycopg2 connections close their socket when finalized: the child must not do it."""
    proc = run_python(
        PSYCOPG2_FORK_SCRIPT,
        timeout=30,
        AIOPGPOOL_TEST_DSN=dsn,
        AIOPGPOOL_TEST_NAME=uname("p2-fork"),
    )
    assert proc.stdout.strip() == "ok"


PSYCOPG2_EXIT_SCRIPT = """
import os
from aiopgpool.psycopg2 import PersistentConnectionPool, ThreadedConnectionPool

dsn, name = os.environ["AIOPGPOOL_TEST_DSN"], os.environ["AIOPGPOOL_TEST_NAME"]
pool = ThreadedConnectionPool(1, 3, dsn, application_name=name)
conn = pool.getconn()
conn.cursor().execute("SELECT 1")  # left in a transaction, never returned
persistent = PersistentConnectionPool(1, 2, dsn, application_name=name)
persistent.getconn()
print("ok", flush=True)
"""


def test_psycopg2_process_exits_cleanly_without_closeall(dsn: str) -> None:
    proc = run_python(
        PSYCOPG2_EXIT_SCRIPT,
        timeout=20,
        AIOPGPOOL_TEST_DSN=dsn,
        AIOPGPOOL_TEST_NAME=uname("p2-exit"),
    )
    assert proc.stdout.strip() == "ok"
    assert "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("cls", "error"),
    [
        (psycopg2.pool.ThreadedConnectionPool, psycopg2.OperationalError),
        (aiopgpool.ThreadedConnectionPool, psycopg.OperationalError),
        (aio2.ThreadedConnectionPool, psycopg2.OperationalError),
    ],
    ids=["real-psycopg2.pool", "psycopg", "psycopg2"],
)
def test_construction_against_a_down_server_raises_the_connection_error(
    cls: Any, error: type[Exception]
) -> None:
    """As psycopg2.pool does, construction raises the driver's own connection error
    (not a PoolTimeout after waiting), shows no password, and leaves no loop thread
    behind retrying."""
    from helpers import closed_port

    before = {t.ident for t in threading.enumerate()}
    dsn = f"host=127.0.0.1 port={closed_port()} user=x password=sekrit-down"
    with pytest.raises(error) as info:
        cls(1, 2, dsn)
    assert not isinstance(info.value, aiopgpool.PoolTimeout)
    assert "sekrit-down" not in str(info.value)
    assert eventually_blocking(lambda: new_loop_threads(before), []) == []


def test_construction_raises_pool_timeout_when_connects_neither_fail_nor_succeed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection attempt that hangs (a server that accepts and never answers) is
    bounded: PoolTimeout after OPEN_TIMEOUT, and no loop thread left behind."""
    import socket

    monkeypatch.setattr(aiopgpool.dropins, "OPEN_TIMEOUT", 0.5)
    before = {t.ident for t in threading.enumerate()}
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        with pytest.raises(aiopgpool.PoolTimeout):
            aiopgpool.ThreadedConnectionPool(1, 2, f"host=127.0.0.1 port={port} user=x")
    assert eventually_blocking(lambda: new_loop_threads(before), []) == []


def new_loop_threads(before: set[int | None]) -> list[str]:
    """Names of the pools' loop threads alive now that were not in ``before``."""
    return [
        t.name
        for t in threading.enumerate()
        if t.ident not in before and t.is_alive() and t.name.startswith("aiopgpool-")
    ]


@kinds
def test_psycopg2_dropins_raise_errors_of_both_families(dsn: str, make: Maker, kind: str) -> None:
    """aiopgpool.psycopg2's pool errors are psycopg2.pool.PoolError (what psycopg2 code
    catches) and aiopgpool's own classes, with the same messages."""
    pool = make(cls_of(OURS_PSYCOPG2, kind), 1, 1, dsn)
    conn = pool.getconn()
    with pytest.raises(psycopg2.pool.PoolError, match="connection pool exhausted") as info:
        pool.getconn()
    assert isinstance(info.value, aiopgpool.PoolTimeout)
    assert isinstance(info.value, aio2.PoolTimeout)
    pool.putconn(conn)
    with pytest.raises(psycopg2.pool.PoolError) as info:
        pool.putconn(conn)
    assert isinstance(info.value, aiopgpool.PoolError)
    pool.closeall()
    with pytest.raises(psycopg2.pool.PoolError) as info:
        pool.getconn()
    assert isinstance(info.value, aiopgpool.PoolClosed)
