"""What every command shares about where it runs: the machine, the packages, the server.

Also the throwaway servers (started with :mod:`aiopgpool.testing`, as the tests do) and
how a run's command line is recorded.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from typing import Any

PACKAGES = (
    "aiopgpool",
    "psycopg",
    "psycopg-binary",
    "psycopg-pool",
    "asyncpg",
    "psycopg2-binary",
    "uvloop",
)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError):
        pass
    return None


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages, where the OS has them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def aiopgpool_form() -> str:
    """Which form of aiopgpool's hot paths this process runs (see aiopgpool.native)."""
    from aiopgpool import native

    return native.form()


def machine_info() -> dict[str, Any]:
    """The machine, the Python and the installed versions of the pools under test."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "packages": versions,
        "aiopgpool_form": aiopgpool_form(),
        "load_average_at_start": load_average(),
    }


def server_info(dsn: str) -> dict[str, Any]:
    """The server's version and the settings that bear on the benchmark."""
    import psycopg

    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT current_setting('server_version'), current_setting('max_connections'),"
                " current_setting('shared_buffers')"
            ).fetchone()
    except psycopg.Error as exc:
        return {"error": str(exc)}
    assert row is not None
    return {"server_version": row[0], "max_connections": row[1], "shared_buffers": row[2]}


def redact_dsn(dsn: str) -> str:
    """``dsn`` with any password replaced by ``***``."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        params = conninfo_to_dict(dsn)
    except Exception:
        return "<unparseable dsn>"
    if params.get("password") is None:
        return dsn
    params["password"] = "***"
    return make_conninfo("", **params)


def command_line(argv: Sequence[str], prog: str = "python -m benchmarks") -> str:
    """How a run was invoked (``prog`` and ``argv``), with any password in ``--dsn`` hidden."""
    shown: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            shown.append(redact_dsn(arg))
            hide_next = False
        elif arg == "--dsn":
            shown.append(arg)
            hide_next = True
        elif arg.startswith("--dsn="):
            shown.append("--dsn=" + redact_dsn(arg[len("--dsn=") :]))
        else:
            shown.append(arg)
    return shlex.join([*prog.split(), *shown])


class ServerUnavailable(Exception):
    """No server to benchmark against: no --dsn, and no local cluster could start."""


def describe(exc: BaseException) -> str:
    """A one-line description of an exception, for tables and JSON."""
    text = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
    return " ".join(text.split())[:300]


def local_cluster(**settings: str) -> Any:
    """A started throwaway cluster (``aiopgpool.testing.local_cluster``): stop/start/close it.

    ``settings`` are extra postgresql.conf values. Raises :class:`ServerUnavailable`
    when the testing harness does not import or the cluster does not start.
    """
    try:
        from aiopgpool.testing import local_cluster as start
    except Exception as exc:
        raise ServerUnavailable(
            f"cannot import aiopgpool.testing.local_cluster ({describe(exc)});"
            " pass --dsn to use a running server"
        ) from exc
    try:
        return start(**settings)
    except Exception as exc:
        raise ServerUnavailable(f"the local cluster did not start: {describe(exc)}") from exc


@contextmanager
def database(dsn: str | None, **settings: str) -> Iterator[tuple[str, str]]:
    """Yield (dsn, where it came from): ``dsn`` itself, or a throwaway local cluster."""
    if dsn:
        yield dsn, "--dsn"
        return
    cluster = local_cluster(**settings)
    try:
        yield cluster.dsn, "local_cluster"
    finally:
        cluster.close()
