"""A URL whose user name or password has an unescaped ``/`` or ``@`` never leaks a piece of it.

libpq parses such a URL without complaint, with parts of the password as the host, the
port or the dbname, which reprs, log lines and connection errors would show. The pools
refuse it (at construction for a static conninfo, at each attempt for a callable) with a
message that quotes nothing of it; a percent-encoded password still works.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, urlencode

import psycopg
import pytest
from helpers import chain_texts, log_texts, unique_name
from psycopg.conninfo import conninfo_to_dict

import aiopgpool
import aiopgpool.psycopg2
from aiopgpool import (
    AsyncConnectionPool,
    AsyncNullConnectionPool,
    AsyncReplicatedPool,
    ConnectionPool,
    NullConnectionPool,
    PoolTimeout,
    ReplicatedPool,
)
from aiopgpool.conninfo import ConnectTarget, parse_conninfo, url_problem

# -- which URLs are malformed (no server) ---------------------------------------------------

#: URLs libpq reads as meant, with (part of) what it reads: never refused.
VALID: list[tuple[str, dict[str, str]]] = [
    ("postgresql://alice:pass@localhost/db", {"password": "pass", "host": "localhost"}),
    ("postgres://alice:pass@localhost/db", {"password": "pass", "host": "localhost"}),
    ("postgresql://alice:pa?ss@localhost/db", {"password": "pa?ss", "host": "localhost"}),
    ("postgresql://alice:pa:ss@localhost/db", {"password": "pa:ss", "host": "localhost"}),
    ("postgresql://alice:pa#ss@localhost/db", {"password": "pa#ss", "dbname": "db"}),
    ("postgresql://alice:pa%2Fss@localhost/db", {"password": "pa/ss", "host": "localhost"}),
    ("postgresql://alice:pa%40ss@localhost/db", {"password": "pa@ss", "host": "localhost"}),
    ("postgresql://al%40ice:pw@localhost/db", {"user": "al@ice", "host": "localhost"}),
    ("postgresql://alice@[::1]:5432/db", {"host": "::1", "port": "5432"}),
    ("postgresql://[::1]:5432,[::2]/db", {"host": "::1,::2", "port": "5432,"}),
    ("postgresql://alice:pw@h1:5432,h2:5433/db", {"host": "h1,h2", "port": "5432,5433"}),
    ("postgresql://h1/db?options=-c%20x%3Dy@z", {"options": "-c x=y@z", "dbname": "db"}),
    ("postgresql://h1/db?user=a@b", {"user": "a@b", "host": "h1"}),
    ("postgresql://h1/db?options=a@b/c", {"options": "a@b/c", "dbname": "db"}),
    ("postgresql://u:p@h1/db?host=%40sock", {"host": "@sock"}),
    ("postgresql://u:p@h1/db?port=5433", {"port": "5433"}),
    ("postgresql://h1/d%40b", {"dbname": "d@b"}),
    ("postgresql://%40sock/db", {"host": "@sock"}),  # an abstract Unix socket
    ("postgresql://h:/db", {"host": "h"}),
    ("postgresql:///db", {"dbname": "db"}),
    ("postgresql://", {}),
    ("postgresql://localhost", {"host": "localhost"}),
    ("postgres://u:p@/db?host=/tmp", {"host": "/tmp", "password": "p"}),
    # Not URLs: libpq's keyword form has no such ambiguity.
    ("host=h password=p@ss/word dbname=db", {"password": "p@ss/word"}),
    ("dbname=a@b", {"dbname": "a@b"}),
]

USERINFO = "user name or password has an unescaped '/' or '@'"
PORT = "port is not a number"

#: URLs libpq accepts but reads otherwise than meant, with the message's words.
MALFORMED: list[tuple[str, str]] = [
    ("postgresql://alice:pa/ss@localhost/db", USERINFO),  # host alice, port pa, dbname ss@...
    ("postgresql://alice:p@ss@localhost/db", USERINFO),  # password p, host ss@localhost
    ("postgresql://alice:pa/ss@localhost", USERINFO),
    ("postgresql://alice:p@ss@localhost", USERINFO),
    ("postgres://alice:p@ss@localhost/db", USERINFO),
    ("postgresql://al/ice@localhost/db", USERINFO),  # a user name with '/'
    ("postgresql://al@ice:pw@localhost/db", USERINFO),  # user al, host ice, port pw@localhost
    ("postgresql://alice:p@s/s@localhost/db", USERINFO),
    ("postgresql://alice:pw@h1,ss@h2/db", USERINFO),
    ("postgresql://alice:pa/ss@h/db?sslmode=disable", USERINFO),
    ("postgresql://alice:pa/ss@[::1]:5432/db", USERINFO),
    ("postgresql://u@@sock/db", USERINFO),  # an '@' in a host is written %40
    ("postgresql://h/d@b", USERINFO),  # an '@' in a dbname is written %40
    ("postgresql://alice:pa/s?host=x@h/db", USERINFO),  # the "@" went to the query
    ("postgresql://h:abc/db", PORT),
    ("postgresql://u:p@h1/db?host=x@y", USERINFO),  # a host has no '@'
    ("postgresql://alice:123/x?host=y@h/db", USERINFO),  # password 123/x?host=y
    ("postgresql://alice:123/x?hostaddr=y@h/db", USERINFO),
    ("postgresql://alice:123/x?port=y@h/db", PORT),
]


@pytest.mark.parametrize(("url", "expected"), VALID, ids=[u for u, _ in VALID])
def test_valid_urls_are_taken(url: str, expected: dict[str, str]) -> None:
    """What libpq reads right is never refused."""
    params = conninfo_to_dict(url)
    assert {key: params.get(key) for key in expected} == expected
    assert url_problem(url) is None
    assert parse_conninfo(url) == params


@pytest.mark.parametrize(("url", "words"), MALFORMED, ids=[u for u, _ in MALFORMED])
def test_malformed_urls_are_refused(url: str, words: str) -> None:
    """libpq takes them (that is the trouble); parse_conninfo refuses them, quoting nothing."""
    conninfo_to_dict(url)
    assert url_problem(url) is not None
    with pytest.raises(ValueError, match="conninfo") as info:
        parse_conninfo(url)
    message = str(info.value)
    assert words in message and "%2F" in message
    assert message == url_problem(url)
    assert info.value.__cause__ is None and info.value.__context__ is None


def test_the_messages_quote_nothing_of_the_url() -> None:
    """Two fixed messages for every malformed URL: nothing of any of them is quoted."""
    assert len({url_problem(url) for url, _ in MALFORMED}) == 2


# -- distinctive passwords: every constructor refuses them, quoting nothing -----------------

ONE, TWO = "FRAGONE", "FRAGTWO"
PASSWORDS = {"slash": f"{ONE}/{TWO}", "at": f"{ONE}@{TWO}", "at-slash": f"{ONE}@x/{TWO}"}


def bad_url(password: str, host: str = "127.0.0.1", port: int = 5432) -> str:
    """The URL a caller writes without percent-encoding ``password``."""
    return f"postgresql://postgres:{password}@{host}:{port}/postgres"


def assert_no_fragment(texts: list[str], *secrets: str) -> None:
    """No text holds a piece of the password (either side of its '/' or '@')."""
    pieces = {ONE, TWO, *secrets}
    leaks = [text for text in texts if any(piece in text for piece in pieces)]
    assert leaks == []


def _constructors() -> dict[str, Callable[[str], object]]:
    pg2 = aiopgpool.psycopg2
    return {
        "AsyncConnectionPool": lambda url: AsyncConnectionPool(url),
        "AsyncNullConnectionPool": lambda url: AsyncNullConnectionPool(url),
        "ConnectionPool": lambda url: ConnectionPool(url),
        "NullConnectionPool": lambda url: NullConnectionPool(url, max_size=1),
        "SimpleConnectionPool": lambda url: aiopgpool.SimpleConnectionPool(0, 1, url),
        "ThreadedConnectionPool": lambda url: aiopgpool.ThreadedConnectionPool(0, 1, dsn=url),
        "PersistentConnectionPool": lambda url: aiopgpool.PersistentConnectionPool(0, 1, url),
        "psycopg2.SimpleConnectionPool": lambda url: pg2.SimpleConnectionPool(0, 1, url),
        "psycopg2.ThreadedConnectionPool": lambda url: pg2.ThreadedConnectionPool(0, 1, url),
        "psycopg2.PersistentConnectionPool": lambda url: pg2.PersistentConnectionPool(0, 1, url),
        "config_pool": lambda url: aiopgpool.config_pool(db_url=url),
        "AsyncReplicatedPool.primary": lambda url: AsyncReplicatedPool(url, ["host=r1"]),
        "AsyncReplicatedPool.replica": lambda url: AsyncReplicatedPool("host=p", ["host=r", url]),
        "ReplicatedPool.primary": lambda url: ReplicatedPool(url, ["host=r1"]),
        "ReplicatedPool.replica": lambda url: ReplicatedPool("host=p", ["host=r", url]),
    }


CONSTRUCTORS = _constructors()


@pytest.mark.parametrize("password", list(PASSWORDS.values()), ids=list(PASSWORDS))
@pytest.mark.parametrize("make", list(CONSTRUCTORS.values()), ids=list(CONSTRUCTORS))
def test_constructors_refuse_a_malformed_url(
    make: Callable[[str], object], password: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every pool class raises ValueError naming the problem, with nothing of the password."""
    caplog.set_level(logging.DEBUG, logger="aiopgpool")
    with pytest.raises(ValueError, match="unescaped '/' or '@'") as info:
        make(bad_url(password))
    assert "%2F" in str(info.value)
    # A replicated pool re-raises the member's error with its name (from None): that
    # one is the suppressed context, and chain_texts reads it too.
    assert info.value.__cause__ is None
    assert_no_fragment(chain_texts(info.value) + log_texts(caplog.records))


@pytest.mark.parametrize("cls", [AsyncReplicatedPool, ReplicatedPool])
def test_replicated_pools_name_the_member(cls: Callable[..., object]) -> None:
    """A replicated pool's error says which member's URL is malformed."""
    with pytest.raises(ValueError, match=r"^primary: conninfo: the URL's user name"):
        cls(bad_url(PASSWORDS["slash"]), ["host=r1"])
    with pytest.raises(ValueError, match=r"^replica 2: conninfo: the URL's user name"):
        cls("host=p", ["host=r1", bad_url(PASSWORDS["at"])])


def test_description_shows_no_fragment_of_a_malformed_url() -> None:
    """describe() (reprs, log lines), second line of defence: should a malformed URL get
    past the constructor, nothing parsed from it is shown; keyword arguments still are."""
    for password in PASSWORDS.values():
        target = ConnectTarget("dbname=x", {"port": 5433}, "t")
        target._static = (bad_url(password), {"port": 5433})
        text = target.describe()
        assert "malformed URL" in text and "port=5433" in text
        assert_no_fragment([text])
    # A host or port with an '@' is not shown, whatever gave it.
    target = ConnectTarget("dbname=db", {"host": f"{TWO}@h", "port": f"{ONE}@1"}, "t")
    assert_no_fragment([target.describe()])
    assert "dbname=db" in target.describe()
    # An abstract socket's leading '@' is no such piece.
    assert "host=@sock" in ConnectTarget("postgresql://%40sock/db", None, "t").describe()


# -- against a server: a callable conninfo fails each attempt, quoting nothing --------------


def _server(dsn: str) -> tuple[str, int]:
    params = conninfo_to_dict(dsn)
    host = str(params.get("host") or "127.0.0.1").split(",")[0]
    if host.startswith("/"):
        host = "127.0.0.1"  # the malformed URL is refused before any connect
    return host, int(str(params.get("port") or 5432).split(",")[0])


@pytest.fixture(params=list(PASSWORDS.values()), ids=list(PASSWORDS))
def malformed(request: pytest.FixtureRequest, dsn: str) -> str:
    """A malformed URL naming the test server."""
    host, port = _server(dsn)
    return bad_url(str(request.param), host, port)


async def test_async_pool_with_a_callable_conninfo(
    malformed: str, caplog: pytest.LogCaptureFixture
) -> None:
    """open(wait=True), getconn() and open(fail_fast=True) fail with the clear error; no
    fragment in the exceptions, their chains, the log records or the repr."""
    caplog.set_level(logging.DEBUG, logger="aiopgpool")
    pool = AsyncConnectionPool(
        lambda: malformed,
        name=unique_name("frag-async"),
        min_size=1,
        max_size=2,
        timeout=1,
        reconnect_timeout=0.2,
    )
    texts = [repr(pool), str(pool)]
    try:
        with pytest.raises(PoolTimeout) as timed_out:
            await asyncio.wait_for(pool.open(wait=True, timeout=1), 10)
        assert isinstance(timed_out.value.__cause__, ValueError)
        assert "unescaped '/' or '@'" in str(timed_out.value.__cause__)
        texts += chain_texts(timed_out.value)
        with pytest.raises(PoolTimeout) as timed_out:
            await asyncio.wait_for(pool.getconn(timeout=0.5), 10)
        texts += chain_texts(timed_out.value)
        texts += [repr(pool), str(pool), repr(pool.stats()), repr(pool.get_stats())]
    finally:
        await pool.close()
    texts += [repr(pool)]
    fast = AsyncConnectionPool(lambda: malformed, name=unique_name("frag-fast"), min_size=1)
    try:
        with pytest.raises(ValueError, match="unescaped '/' or '@'") as refused:
            await asyncio.wait_for(fast.open(wait=True, timeout=10, fail_fast=True), 20)
        texts += chain_texts(refused.value)
    finally:
        await fast.close()
    logged = log_texts(caplog.records)
    assert any("unescaped '/' or '@'" in text for text in logged), "the attempts were logged"
    assert_no_fragment(texts + logged)


def test_sync_pool_with_a_callable_conninfo(
    malformed: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The sync facade, on its loop thread: the same error, no fragment anywhere."""
    caplog.set_level(logging.DEBUG, logger="aiopgpool")
    pool: ConnectionPool[Any] = ConnectionPool(
        lambda: malformed,
        name=unique_name("frag-sync"),
        min_size=1,
        max_size=2,
        timeout=1,
        reconnect_timeout=0.2,
    )
    texts = [repr(pool)]
    try:
        with pytest.raises(PoolTimeout) as timed_out:
            pool.open(wait=True, timeout=1)
        assert isinstance(timed_out.value.__cause__, ValueError)
        texts += chain_texts(timed_out.value)
        with pytest.raises(PoolTimeout) as timed_out:
            pool.getconn(timeout=0.5)
        texts += chain_texts(timed_out.value)
        texts += [repr(pool), repr(pool.stats())]
    finally:
        pool.close()
    logged = log_texts(caplog.records)
    assert any("unescaped '/' or '@'" in text for text in logged)
    assert_no_fragment(texts + logged)


@pytest.mark.parametrize("module", [aiopgpool, aiopgpool.psycopg2], ids=["psycopg", "psycopg2"])
def test_dropin_with_a_callable_dsn(
    malformed: str, module: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A drop-in opens at construction: it raises the clear error itself."""
    caplog.set_level(logging.DEBUG, logger="aiopgpool")
    with pytest.raises(ValueError, match="unescaped '/' or '@'") as refused:
        module.SimpleConnectionPool(1, 2, lambda: malformed)
    assert_no_fragment(chain_texts(refused.value) + log_texts(caplog.records))


async def test_replicated_pool_with_callable_members(
    malformed: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Members and their probes fail with the clear error; members() and the logs hold no
    fragment."""
    caplog.set_level(logging.DEBUG, logger="aiopgpool")
    pool: AsyncReplicatedPool[Any] = AsyncReplicatedPool(
        lambda: malformed,
        [lambda: malformed.replace("postgres:", "replica:")],
        name=unique_name("frag-repl"),
        min_size=0,
        max_size=1,
        timeout=1,
        reconnect_timeout=0.2,
    )
    texts = [repr(pool)]
    try:
        await pool.open()
        await asyncio.wait_for(pool.probe(), 30)
        statuses = pool.members()
        assert all(
            status.error is not None and "unescaped '/' or '@'" in status.error
            for status in statuses.values()
        ), statuses
        texts += [repr(statuses), repr(pool)]
        with pytest.raises(PoolTimeout) as timed_out:
            await asyncio.wait_for(pool.getconn(timeout=0.5), 10)
        texts += chain_texts(timed_out.value)
        with pytest.raises(PoolTimeout) as timed_out:
            await asyncio.wait_for(pool.getconn(timeout=0.5, read_only=True), 10)
        texts += chain_texts(timed_out.value)
    finally:
        await pool.close()
    assert_no_fragment(texts + log_texts(caplog.records))


# -- a percent-encoded password works ----------------------------------------------------------


def good_url(dsn: str, password: str) -> str:
    """The test server as a URL with ``password`` percent-encoded."""
    params = conninfo_to_dict(dsn)
    params.pop("password", None)
    user = quote(str(params.pop("user", "postgres")), safe="")
    host = str(params.pop("host", "") or "")
    port = params.pop("port", None)
    dbname = quote(str(params.pop("dbname", "postgres")), safe="")
    query = {key: str(value) for key, value in params.items()}
    netloc = f"{user}:{quote(password, safe='')}@"
    if host.startswith("/"):
        query["host"] = host
        if port:
            query["port"] = str(port)
    else:
        netloc += f"[{host}]" if ":" in host else host
        if port:
            netloc += f":{port}"
    return f"postgresql://{netloc}/{dbname}" + (f"?{urlencode(query)}" if query else "")


@pytest.fixture
def encoded_password(dsn: str) -> Iterator[str]:
    """A password with '/' and '@' for the test server (trust auth takes any), or the
    server's own when its DSN has one."""
    own = conninfo_to_dict(dsn).get("password")
    yield str(own) if own else f"{ONE}/{TWO}@x"


async def test_a_percent_encoded_password_connects(
    dsn: str, encoded_password: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``pa%2Fss``-style URLs are valid: the pool connects, and shows no password."""
    caplog.set_level(logging.DEBUG, logger="aiopgpool")
    url = good_url(dsn, encoded_password)
    assert conninfo_to_dict(url)["password"] == encoded_password
    pool = AsyncConnectionPool(url, name=unique_name("frag-good"), min_size=1, timeout=5)
    texts = [repr(pool)]
    try:
        await pool.open(wait=True, timeout=10)
        async with pool.connection() as conn:
            assert (await (await conn.execute("SELECT 1")).fetchone()) == (1,)
        texts += [repr(pool)]
    finally:
        await pool.close()
    with ConnectionPool(url, name=unique_name("frag-good-sync"), min_size=1, open=True) as sync:
        with sync.connection() as sconn:
            assert sconn.execute("SELECT 1").fetchone() == (1,)
        texts += [repr(sync)]
    assert "host=" in texts[0]
    assert_no_fragment(
        texts + log_texts(caplog.records), encoded_password, quote(encoded_password, safe="")
    )


def test_psycopg_reads_the_encoded_password(dsn: str, encoded_password: str) -> None:
    """The encoded URL reaches the server as libpq reads it (a plain connect, no pool)."""
    with psycopg.connect(good_url(dsn, encoded_password)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
