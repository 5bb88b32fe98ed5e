"""Facts about the machine, the packages and the server, recorded with the results."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

PACKAGES = ("aiopgpool", "psycopg", "psycopg-binary", "psycopg-pool", "asyncpg", "psycopg2-binary")


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
