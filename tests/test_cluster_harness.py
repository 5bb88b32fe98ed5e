"""The replicated cluster and PgBouncer harnesses (aiopgpool.testing.cluster, .bouncer),
against real servers."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from aiopgpool.testing import (
    LocalCluster,
    PgBouncer,
    PostgresServer,
    ReplicatedCluster,
)
from aiopgpool.testing import (
    cluster as cluster_module,
)
from aiopgpool.testing.bouncer import find_pgbouncer

MakeBouncer = Callable[..., PgBouncer]  # the pgbouncer fixture (see conftest)


def _one(dsn: str, query: str, params: tuple[Any, ...] = ()) -> Any:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def _accepting(node: LocalCluster) -> bool:
    try:
        psycopg.connect(node.dsn, connect_timeout=2).close()
    except psycopg.OperationalError:
        return False
    return True


@pytest.fixture(scope="module")
def rc() -> Iterator[ReplicatedCluster]:
    """A primary and two standbys, shared by the tests that do not change roles."""
    with ReplicatedCluster(standbys=2) as cluster:
        yield cluster


@pytest.fixture
def pair() -> Iterator[ReplicatedCluster]:
    """A primary and one standby, for a test that promotes or stops nodes."""
    with ReplicatedCluster(standbys=1) as cluster:
        yield cluster


def test_a_write_on_the_primary_is_seen_on_every_standby(rc: ReplicatedCluster) -> None:
    assert len(rc.nodes) == 3 and rc.nodes[0] is rc.primary
    assert rc.standbys == rc.nodes[1:]
    assert len({node.port for node in rc.nodes}) == 3
    assert all(node.host == "127.0.0.1" for node in rc.nodes)
    assert not rc.in_recovery(rc.primary)
    assert all(rc.in_recovery(node) for node in rc.standbys)
    with psycopg.connect(rc.primary.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE replicated (x int)")
        conn.execute("INSERT INTO replicated VALUES (7)")
    rc.wait_caught_up()
    for node in rc.standbys:
        assert _one(node.dsn, "SELECT sum(x) FROM replicated") == 7
        assert _one(node.dsn, "SELECT status FROM pg_stat_wal_receiver") == "streaming"
    slots = _one(rc.primary.dsn, "SELECT array_agg(slot_name ORDER BY 1) FROM pg_replication_slots")
    assert slots == ["standby_1", "standby_2"]
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        _one(rc.standbys[0].dsn, "INSERT INTO replicated VALUES (1) RETURNING x")


def test_the_multi_host_conninfo_names_every_node(rc: ReplicatedCluster) -> None:
    ports = ",".join(str(node.port) for node in rc.nodes)
    conninfo = rc.conninfo(target_session_attrs="read-write", connect_timeout="5")
    assert conninfo.startswith(f"host=127.0.0.1,127.0.0.1,127.0.0.1 port={ports} ")
    assert "password" not in conninfo
    with psycopg.connect(conninfo) as conn:
        assert conn.info.port == rc.primary.port
    with psycopg.connect(rc.conninfo(target_session_attrs="standby")) as conn:
        assert conn.info.port in {node.port for node in rc.standbys}
    only_standbys = rc.conninfo(rc.standbys, target_session_attrs="read-write", connect_timeout="2")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(only_standbys)


def test_pause_and_resume_replay(rc: ReplicatedCluster) -> None:
    paused, other = rc.standbys
    rc.pause_replay(paused)
    try:
        with psycopg.connect(rc.primary.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE while_paused (x int)")
        rc.wait_caught_up([other])
        assert _one(other.dsn, "SELECT to_regclass('while_paused') IS NOT NULL")
        time.sleep(0.3)
        assert _one(paused.dsn, "SELECT to_regclass('while_paused') IS NULL")
        with pytest.raises(TimeoutError, match="not caught up"):
            rc.wait_caught_up([paused], timeout=0.5)
    finally:
        rc.resume_replay(paused)
    rc.wait_caught_up()
    assert _one(paused.dsn, "SELECT to_regclass('while_paused') IS NOT NULL")


def test_make_read_only_in_place_and_back(rc: ReplicatedCluster) -> None:
    primary = rc.primary
    pid = primary.pid
    before = psycopg.connect(primary.dsn, autocommit=True)
    try:
        rc.make_read_only(primary)
        assert primary.pid == pid  # no restart
        assert not rc.in_recovery(primary)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            _one(primary.dsn, "CREATE TABLE refused (x int)")
        # A session opened before sees it at its next transaction, and is told.
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            before.execute("CREATE TABLE refused (x int)")
        assert before.info.parameter_status("default_transaction_read_only") == "on"
        rw = rc.conninfo(target_session_attrs="read-write", connect_timeout="2")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(rw)  # no node is writable now
        rc.make_writable(primary)
        assert primary.pid == pid
        with psycopg.connect(rw) as conn:
            assert conn.info.port == primary.port
        before.execute("CREATE TABLE accepted (x int)")
    finally:
        before.close()
        rc.make_writable(primary)


def test_promote_flips_recovery_moves_the_primary_and_rejoin_follows(
    pair: ReplicatedCluster,
) -> None:
    old, standby = pair.primary, pair.standbys[0]
    pair.stop(old)
    assert not old.running and not _accepting(old)
    pair.promote(standby)
    assert pair.primary is standby and pair.standbys == [old]
    assert not pair.in_recovery(standby)
    assert _one(standby.dsn, "SELECT pg_is_in_recovery()") is False
    with psycopg.connect(standby.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE after_failover (x int)")
    rw = pair.conninfo(target_session_attrs="read-write", connect_timeout="2")
    with psycopg.connect(rw) as conn:
        assert conn.info.port == standby.port
    pair.start(old)  # the old primary comes back as a primary of its own: split brain
    assert not pair.in_recovery(old)
    pair.restart(standby)
    assert not pair.in_recovery(standby)

    port = old.port
    pair.rejoin(old)  # a standby of the new primary, on the same port
    assert old.port == port and pair.in_recovery(old)
    with psycopg.connect(standby.dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO after_failover VALUES (3)")
    pair.wait_caught_up()
    assert _one(old.dsn, "SELECT sum(x) FROM after_failover") == 3
    assert _one(standby.dsn, "SELECT slot_name FROM pg_replication_slots") == f"node_{port}"
    with pytest.raises(ValueError, match="primary"):
        pair.rejoin(standby)


def test_close_removes_every_node() -> None:
    with ReplicatedCluster(standbys=1, slots=False) as cluster:
        dirs = [node.base_dir for node in cluster.nodes]
        nodes = list(cluster.nodes)
        assert _one(cluster.primary.dsn, "SELECT count(*) FROM pg_replication_slots") == 0
        assert all(d.is_dir() for d in dirs)
    assert all(node.closed and not node.running for node in nodes)
    assert not any(d.exists() for d in dirs)
    assert not any(_accepting(node) for node in nodes)
    cluster.close()  # idempotent


def test_a_failed_standby_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[LocalCluster] = []
    real = cluster_module._Node._make_data_dir

    def failing_standby(self: Any) -> None:
        made.append(self)
        if self.source is not None:
            raise RuntimeError("pg_basebackup failed (on purpose)")
        real(self)

    monkeypatch.setattr(cluster_module._Node, "_make_data_dir", failing_standby)
    with pytest.raises(RuntimeError, match="on purpose"):
        ReplicatedCluster(standbys=1)
    primary, standby = made
    assert primary.closed and not primary.base_dir.exists() and not _accepting(primary)
    assert not standby.base_dir.exists()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="standbys"):
        ReplicatedCluster(standbys=-1)


# -- PgBouncer ----------------------------------------------------------------------------


def test_session_mode_serves_queries_through_psycopg(
    pgbouncer: MakeBouncer, pg_server: PostgresServer
) -> None:
    bouncer = pgbouncer("session")
    assert bouncer.host == "127.0.0.1" and bouncer.port != pg_server.port
    assert bouncer.dsn == f"host=127.0.0.1 port={bouncer.port} user=postgres dbname=postgres"
    with psycopg.connect(bouncer.dsn, autocommit=True, connect_timeout=5) as conn:
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
        conn.execute("SET work_mem = '3MB'")
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()
        # Session mode: the same server session for the whole client connection.
        assert conn.execute("SHOW work_mem").fetchone() == ("3MB",)
        assert conn.execute("SELECT pg_backend_pid()").fetchone() == pid
        with conn.transaction():
            conn.execute("SELECT 1")
    assert _pool_mode(bouncer) == "session"


def test_transaction_mode_shares_server_connections(pgbouncer: MakeBouncer) -> None:
    bouncer = pgbouncer("transaction", default_pool_size=1)
    with (
        psycopg.connect(bouncer.dsn, autocommit=True, connect_timeout=5) as one,
        psycopg.connect(bouncer.dsn, autocommit=True, connect_timeout=5) as two,
    ):
        # One server connection serves both clients, between their transactions.
        pids = {c.execute("SELECT pg_backend_pid()").fetchone() for c in (one, two, one)}
        assert len(pids) == 1
        with one.transaction():
            one.execute("SELECT 1")
    assert _pool_mode(bouncer) == "transaction"


def test_a_bouncer_stops_starts_and_cleans_up(
    pgbouncer_binary: Path, own_server: PostgresServer
) -> None:
    bouncer = PgBouncer(own_server, "transaction", binary=pgbouncer_binary)
    try:
        port, base = bouncer.port, bouncer.base_dir
        assert "password" not in bouncer.config_path.read_text()
        bouncer.restart()
        assert bouncer.port == port and bouncer.running
        assert _one(bouncer.dsn, "SELECT 1") == 1
        bouncer.stop()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(bouncer.dsn, connect_timeout=2)
        bouncer.start()
        assert _one(bouncer.dsn, "SELECT 2") == 2
    finally:
        bouncer.close()
    assert bouncer.closed and not base.exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(bouncer.dsn, connect_timeout=2)
    with pytest.raises(RuntimeError, match="closed"):
        bouncer.start()


class _Elsewhere(PostgresServer):
    def __init__(self, host: str) -> None:
        self.host, self.port = host, 5432


def test_bouncer_arguments_are_checked(tmp_path: Path) -> None:
    binary = find_pgbouncer() or tmp_path / "pgbouncer"  # never started below
    local = _Elsewhere("127.0.0.1")
    with pytest.raises(ValueError, match="pool_mode"):
        PgBouncer(local, "statement-ish", binary=binary)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="setting"):
        PgBouncer(local, settings={"pool_mode = session\nlisten_addr": "*"}, binary=binary)
    with pytest.raises(ValueError, match="loopback"):
        PgBouncer(_Elsewhere("192.0.2.1"), binary=binary)


def _pool_mode(bouncer: PgBouncer) -> str:
    # The admin console speaks the simple query protocol only.
    with psycopg.connect(bouncer.admin_dsn, autocommit=True, connect_timeout=5) as admin:
        rows = admin.execute("SHOW CONFIG", prepare=False).fetchall()
    return str(next(row[1] for row in rows if row[0] == "pool_mode"))
