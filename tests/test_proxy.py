"""Tests of the fault-injection proxy (aiopgpool.testing.proxy) against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from aiopgpool.testing.proxy import TcpProxy

# Generous bounds: "fails fast" must beat HANG_AT by far; "hangs" must last at least HANG_AT.
FAST = 3.0
HANG_AT = 0.9


def _target(dsn: str) -> tuple[str, int]:
    params = conninfo_to_dict(dsn)
    return str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432)


def _on_loopback(dsn: str) -> bool:
    try:
        TcpProxy(*_target(dsn))
    except ValueError:
        return False
    return True


@pytest.fixture
def target_dsn(request: pytest.FixtureRequest, dsn: str) -> str:
    """The shared server if it is on loopback (the proxy targets nothing else), else our own."""
    if _on_loopback(dsn):
        return dsn
    own: str = request.getfixturevalue("own_server").dsn
    return own


@pytest.fixture
def proxy(target_dsn: str) -> Iterator[TcpProxy]:
    host, port = _target(target_dsn)
    with TcpProxy(host, port) as p:
        yield p


def _wait_for(predicate: object, timeout: float = 3.0) -> bool:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def _query(conninfo: str, timeout: int = 5) -> object:
    with psycopg.connect(conninfo, connect_timeout=timeout, autocommit=True) as conn:
        row = conn.execute("SELECT 42").fetchone()
    assert row is not None
    return row[0]


# -- validation (no server needed) ---------------------------------------------


@pytest.mark.parametrize(
    "address", ["10.1.2.3", "192.168.0.1", "0.0.0.0", "::", "8.8.8.8", "example.com", "/tmp"]
)
def test_rejects_non_loopback_target(address: str) -> None:
    with pytest.raises(ValueError, match=address.replace(".", r"\.")):
        TcpProxy(address, 5432)


@pytest.mark.parametrize("address", ["10.1.2.3", "0.0.0.0", "::", "example.com"])
def test_rejects_non_loopback_listen(address: str) -> None:
    with pytest.raises(ValueError, match=address.replace(".", r"\.")):
        TcpProxy("127.0.0.1", 5432, listen_host=address)


@pytest.mark.parametrize("address", ["127.0.0.1", "127.3.2.1", "::1", "localhost"])
def test_accepts_loopback(address: str) -> None:
    TcpProxy(address, 5432)


def test_other_validation() -> None:
    with pytest.raises(ValueError):
        TcpProxy("127.0.0.1", 0)
    with pytest.raises(ValueError):
        TcpProxy("127.0.0.1", 70000)
    p = TcpProxy("127.0.0.1", 5432)
    with pytest.raises(RuntimeError):
        _ = p.port
    with pytest.raises(ValueError, match="bogus"):
        p.set_mode("bogus")
    p.close()
    with pytest.raises(RuntimeError):
        p.start()


def test_dsn_points_at_proxy() -> None:
    with TcpProxy("127.0.0.1", 5432) as p:
        params = conninfo_to_dict(
            p.dsn("host=db.invalid hostaddr=10.0.0.1 port=6543 user=app dbname=x password=pw")
        )
        assert params == {
            "host": "127.0.0.1",
            "port": str(p.port),
            "user": "app",
            "dbname": "x",
            "password": "pw",
        }
        params = conninfo_to_dict(p.dsn("postgresql://app@db.invalid:6543/x?sslmode=disable"))
        assert params["host"] == "127.0.0.1"
        assert params["port"] == str(p.port)
        assert params["sslmode"] == "disable"


# -- against a real server ---------------------------------------------------------


def test_forward(proxy: TcpProxy, target_dsn: str) -> None:
    assert proxy.mode == "forward"
    assert proxy.connections == 0
    with psycopg.connect(proxy.dsn(target_dsn), autocommit=True) as conn:
        row = conn.execute("SELECT inet_server_port(), 1 + 1").fetchone()
        assert row is not None
        assert row[0] == _target(target_dsn)[1]  # really the server behind the proxy
        assert row[1] == 2
        # Something bigger than one read chunk, both ways.
        big = "x" * 300_000
        row = conn.execute("SELECT %s::text", [big]).fetchone()
        assert row is not None
        assert row[0] == big
        assert proxy.connections == 1
    assert _wait_for(lambda: proxy.connections == 0)


def test_blackhole_new_connection_hangs_then_forward(proxy: TcpProxy, target_dsn: str) -> None:
    proxy.blackhole()
    assert proxy.mode == "blackhole"
    t0 = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        # psycopg, like libpq, treats connect_timeout < 2 as 2.
        psycopg.connect(proxy.dsn(target_dsn), connect_timeout=1)
    assert HANG_AT <= time.monotonic() - t0 < 10
    proxy.forward()
    assert _query(proxy.dsn(target_dsn)) == 42


def test_blackhole_idle_connection_survives_a_short_cut(proxy: TcpProxy, target_dsn: str) -> None:
    with psycopg.connect(proxy.dsn(target_dsn), autocommit=True) as conn:
        proxy.blackhole()
        time.sleep(0.2)
        proxy.forward()
        assert conn.execute("SELECT 7").fetchone() == (7,)


async def test_blackhole_existing_connection_hangs_then_reset_fails_fast(
    proxy: TcpProxy, target_dsn: str
) -> None:
    aconn = await psycopg.AsyncConnection.connect(proxy.dsn(target_dsn), autocommit=True)
    try:
        await aconn.execute("SELECT 1")
        proxy.blackhole()
        task = asyncio.ensure_future(aconn.execute("SELECT 2"))
        done, _ = await asyncio.wait({task}, timeout=1.0)
        assert not done, "a query answered through a blackholed proxy"
        assert proxy.connections == 1

        proxy.reset()
        t0 = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            await asyncio.wait_for(task, FAST)
        assert time.monotonic() - t0 < FAST
        assert proxy.connections == 0
    finally:
        await aconn.close()


def test_reset_existing_connection_fails_fast(proxy: TcpProxy, target_dsn: str) -> None:
    with psycopg.connect(proxy.dsn(target_dsn), autocommit=True) as conn:
        conn.execute("SELECT 1")
        proxy.reset()
        t0 = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        assert time.monotonic() - t0 < FAST


def test_reset_new_connections_fail_fast_then_forward(proxy: TcpProxy, target_dsn: str) -> None:
    proxy.reset()
    assert proxy.mode == "reset"
    t0 = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn(target_dsn), connect_timeout=10)
    assert time.monotonic() - t0 < FAST
    assert proxy.connections == 0
    proxy.forward()
    assert _query(proxy.dsn(target_dsn)) == 42


def test_close_in_blackhole_reaches_client_on_forward(proxy: TcpProxy, target_dsn: str) -> None:
    with psycopg.connect(proxy.dsn(target_dsn), autocommit=True) as conn:
        pid = conn.info.backend_pid
        proxy.blackhole()
        with psycopg.connect(target_dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        time.sleep(0.3)
        assert proxy.connections == 1  # partitioned: the client has not been told
        proxy.forward()
        assert _wait_for(lambda: proxy.connections == 0)
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")


def test_target_down_fails_fast() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    with TcpProxy("127.0.0.1", free_port) as p:
        t0 = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(
                p.dsn("host=x port=1 user=postgres dbname=postgres"), connect_timeout=10
            )
        assert time.monotonic() - t0 < FAST
        assert _wait_for(lambda: p.connections == 0)


def test_reset_sends_rst(proxy: TcpProxy) -> None:
    # An existing connection: the peer sees ECONNRESET, not an orderly EOF.
    with socket.create_connection((proxy.host, proxy.port), timeout=FAST) as sock:
        assert _wait_for(lambda: proxy.connections == 1)
        proxy.reset()
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
    # A new connection while in reset mode (the RST may even beat connect()'s return).
    with pytest.raises(ConnectionResetError):  # noqa: SIM117
        with socket.create_connection((proxy.host, proxy.port), timeout=FAST) as sock:
            sock.recv(1)


def test_close_ends_everything(target_dsn: str) -> None:
    host, port = _target(target_dsn)
    proxy = TcpProxy(host, port)
    proxy.start()
    listen_port = proxy.port
    conn = psycopg.connect(proxy.dsn(target_dsn), autocommit=True)
    try:
        conn.execute("SELECT 1")
        proxy.close()
        assert proxy.closed
        assert not any(t.name.startswith("TcpProxy") for t in threading.enumerate())
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", listen_port), timeout=FAST).close()
        proxy.close()  # idempotent
        with pytest.raises(RuntimeError):
            proxy.forward()
    finally:
        conn.close()
