"""Where a pool connects: the conninfo and connect() keywords, resolved before each attempt.

``conninfo`` and ``kwargs`` may be callables (the async pool also takes
coroutine functions), called before every connection attempt, so rotating
credentials need nothing else; an exception they raise counts as a failed
attempt. The pool's ``name`` becomes ``application_name`` unless the user set
one, so a pool's backends can be counted in ``pg_stat_activity``.

Nothing here ever puts a password in a message: libpq's own parse errors may
quote the string, so they are not chained.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from psycopg.conninfo import conninfo_to_dict

__all__ = ["KEEPALIVE_DEFAULTS", "ConnectTarget", "parse_conninfo"]

# Keys of a conninfo worth showing in a repr or a log line.
_SHOWN_KEYS = ("host", "hostaddr", "port", "dbname", "user", "target_session_attrs")

#: TCP keepalives set on every connection whose conninfo sets none of its
#: own: a connection a NAT or a firewall dropped silently is found dead after
#: about 15 + 3 x 5 = 30 s of silence, instead of the system's two hours.
KEEPALIVE_DEFAULTS = {
    "keepalives": "1",
    "keepalives_idle": "15",
    "keepalives_interval": "5",
    "keepalives_count": "3",
}
_KEEPALIVE_KEYS = frozenset(KEEPALIVE_DEFAULTS)
# target_session_attrs values that promise a writable primary.
_PRIMARY_ATTRS = frozenset({"read-write", "primary"})


def parse_conninfo(conninfo: str) -> dict[str, Any]:
    """The conninfo's parameters; ValueError (without the string) when it is not valid."""
    if not isinstance(conninfo, str):
        raise ValueError(f"conninfo must be a string, got {type(conninfo).__name__}")
    try:
        return conninfo_to_dict(conninfo)
    except Exception:
        pass
    # Raised out of the except block: libpq's message may quote the string, password
    # included, and must be neither the cause nor the (suppressed) context.
    raise ValueError("conninfo is not a valid libpq connection string or URL")


def _check_kwargs(kwargs: object) -> dict[str, Any]:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"kwargs must be a mapping, got {type(kwargs).__name__}")
    return dict(kwargs)


class ConnectTarget:
    """The arguments of ``connect()`` for one pool, static or produced per attempt."""

    __slots__ = ("_conninfo", "_kwargs", "_name", "_static", "wants_primary")

    def __init__(self, conninfo: str | Callable[[], Any], kwargs: Any, name: str) -> None:
        self._conninfo = conninfo
        self._kwargs = kwargs
        self._name = name
        self._static: tuple[str, dict[str, Any]] | None = None
        #: The conninfo asks for a writable primary (``target_session_attrs``):
        #: the pool then follows role changes (a callable conninfo: its kwargs decide).
        self.wants_primary = False
        if not callable(conninfo) and not callable(kwargs):
            self._static = self._finish(conninfo, kwargs)
            params = {**parse_conninfo(self._static[0]), **self._static[1]}
            self.wants_primary = params.get("target_session_attrs") in _PRIMARY_ATTRS
        elif not callable(kwargs) and kwargs:
            self.wants_primary = kwargs.get("target_session_attrs") in _PRIMARY_ATTRS

    @property
    def dynamic(self) -> bool:
        """True when conninfo or kwargs are produced before each attempt."""
        return self._static is None

    def _finish(self, conninfo: object, kwargs: object) -> tuple[str, dict[str, Any]]:
        if not isinstance(conninfo, str):
            raise ValueError(
                f"the conninfo callable must return a string, got {type(conninfo).__name__}"
            )
        params = parse_conninfo(conninfo)
        out = _check_kwargs(kwargs)
        if "application_name" not in params and "application_name" not in out:
            out["application_name"] = self._name
        if _KEEPALIVE_KEYS.isdisjoint(params) and _KEEPALIVE_KEYS.isdisjoint(out):
            out.update(KEEPALIVE_DEFAULTS)
        return conninfo, out

    def resolve(self) -> tuple[str, dict[str, Any]]:
        """The conninfo and keywords for the next attempt (callables called; no awaitables)."""
        if self._static is not None:
            return self._static
        conninfo = self._conninfo() if callable(self._conninfo) else self._conninfo
        kwargs = self._kwargs() if callable(self._kwargs) else self._kwargs
        return self._finish(conninfo, kwargs)

    async def resolve_async(self) -> tuple[str, dict[str, Any]]:
        """:meth:`resolve` for the async pool: the callables may be coroutine functions."""
        if self._static is not None:
            return self._static
        conninfo = self._conninfo() if callable(self._conninfo) else self._conninfo
        if inspect.isawaitable(conninfo):
            conninfo = await conninfo
        kwargs = self._kwargs() if callable(self._kwargs) else self._kwargs
        if inspect.isawaitable(kwargs):
            kwargs = await kwargs
        return self._finish(conninfo, kwargs)

    def describe(self) -> str:
        """A password-free description of where the pool connects, for reprs and logs."""
        if self._static is None:
            return "(conninfo from a callable)"
        conninfo, kwargs = self._static
        try:
            params = conninfo_to_dict(conninfo)
        except Exception:
            params = {}
        params.update(kwargs)
        parts = [
            f"{key}={_shown(key, params[key])}"
            for key in _SHOWN_KEYS
            if params.get(key) not in (None, "")
        ]
        return " ".join(parts) or "(default target)"


def _shown(key: str, value: object) -> object:
    """``value`` as a description shows it: a ``dbname`` that is itself a connection string
    (libpq expands one with ``=`` or a URI scheme) may carry a password, and is not shown."""
    expanded = isinstance(value, str) and (
        "=" in value or value.startswith(("postgresql://", "postgres://"))
    )
    return "(a connection string)" if key == "dbname" and expanded else value
