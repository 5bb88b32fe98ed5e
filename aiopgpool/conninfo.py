"""Where a pool connects: the conninfo and connect() keywords, resolved before each attempt.

``conninfo`` and ``kwargs`` may be callables (the async pool also takes
coroutine functions), called before every connection attempt, so rotating
credentials need nothing else; an exception they raise counts as a failed
attempt. The pool's ``name`` becomes ``application_name`` unless the user set
one, so a pool's backends can be counted in ``pg_stat_activity``.

Nothing here ever puts a password in a message: libpq's own parse errors may
quote the string, so they are not chained. A URL whose user name or password
has an unescaped ``/`` or ``@`` is refused too (:func:`url_problem`): libpq
parses it without complaint, but with pieces of the password as the host, the
port or the database name, which reprs, log lines and libpq's or psycopg's
connection errors would then show.
"""

from __future__ import annotations

import configparser
import contextlib
import inspect
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from psycopg.conninfo import conninfo_to_dict

__all__ = ["KEEPALIVE_DEFAULTS", "ConnectTarget", "check_dbname", "parse_conninfo", "url_problem"]

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


# The URI prefixes libpq recognises (uri_prefix_length: case-sensitive, nothing before).
_URL_PREFIXES = ("postgresql://", "postgres://")
_USERINFO_PROBLEM = (
    "conninfo: the URL's user name or password has an unescaped '/' or '@' "
    "(percent-encode them: %2F, %40; an '@' in a host or database name is written %40 too)"
)
_PORT_PROBLEM = (
    "conninfo: the URL's port is not a number "
    "(a '/' in the user name or password must be percent-encoded: %2F)"
)


def parse_conninfo(conninfo: str) -> dict[str, Any]:
    """The conninfo's parameters; ValueError (without the string) when it is not valid.

    Besides what libpq refuses, a URL that :func:`url_problem` finds malformed
    is refused: libpq would read part of its password as a host, port or dbname.
    """
    if not isinstance(conninfo, str):
        raise ValueError(f"conninfo must be a string, got {type(conninfo).__name__}")
    params: dict[str, Any] | None
    try:
        params = conninfo_to_dict(conninfo)
    except Exception:
        params = None
    # Raised out of the except block: libpq's message may quote the string, password
    # included, and must be neither the cause nor the (suppressed) context.
    if params is None:
        raise ValueError("conninfo is not a valid libpq connection string or URL")
    problem = url_problem(conninfo)
    if problem is not None:
        raise ValueError(problem)
    return params


def url_problem(conninfo: str) -> str | None:
    """Why libpq's reading of URL ``conninfo`` cannot be the one meant, or None if it can.

    The message names no part of the string. It mirrors libpq's URI parser
    (``conninfo_uri_parse_options``): the user info is what precedes the first
    ``@`` when no ``/`` comes before it; then hosts (``[IPv6]`` in brackets),
    each with an optional ``:port``, separated by commas, up to a ``/`` or a
    ``?``; then the dbname up to a ``?``; then the query parameters. A user name
    or password with an unescaped ``/`` ends that first scan early (no user
    info: its start becomes a host and a port, the rest the dbname); one with an
    unescaped ``@`` ends the user info early (the rest becomes a host). So the
    URL is malformed when:

    * an ``@`` is left in the hosts part (hosts and ports) or in the dbname
      part (a real ``@`` there must be written ``%40``, which libpq decodes);
    * a host given as a query parameter (``?host=``, ``?hostaddr=``) has an
      ``@`` (a password with a ``/`` and then a ``?`` leaves its pieces there);
    * a port, in the hosts part or a ``?port=`` parameter, is not a number
      (libpq could not connect with it; a user name or password with a ``/``
      leaves one).

    Other query parameters are not examined (``?user=a@b`` is fine), nor is
    anything that is not a URL. Only a string libpq accepted is meant to be passed.
    """
    for prefix in _URL_PREFIXES:
        if conninfo.startswith(prefix):
            rest = conninfo[len(prefix) :]
            break
    else:
        return None
    stop = _find_any(rest, "@/", 0)
    start = stop + 1 if rest[stop : stop + 1] == "@" else 0
    hosts_end, ports = _scan_hosts(rest, start)
    if "@" in rest[start:hosts_end]:
        return _USERINFO_PROBLEM
    query_start = hosts_end
    if rest[hosts_end : hosts_end + 1] == "/":
        query_start = _find_any(rest, "?", hosts_end + 1)
        if "@" in rest[hosts_end + 1 : query_start]:
            return _USERINFO_PROBLEM
    # Hosts and ports given as query parameters: a password with a '/' then a '?' may
    # have put its pieces there ("u:123/x?host=y@h").
    for pair in rest[query_start + 1 :].split("&") if rest[query_start:] else ():
        key, _, value = pair.partition("=")
        key, value = unquote(key), unquote(value)
        if key in ("host", "hostaddr") and not all(_is_host(h) for h in value.split(",")):
            return _USERINFO_PROBLEM
        if key == "port":
            ports += value.split(",")
    if not all(_is_port(port) for port in ports):
        return _PORT_PROBLEM
    return None


def _is_host(host: str) -> bool:
    """No ``@`` but a leading one (an abstract Unix socket): a host cannot have one."""
    return "@" not in host[1:]


_DBNAME_PROBLEM = (
    "conninfo: the dbname is itself a connection string with a password: psycopg "
    "passes it to the server as a database name, which would quote it in its error; "
    "pass that connection string as the conninfo instead"
)


def check_dbname(dbname: object) -> None:
    """Refuse a ``dbname`` that is a connection string carrying a password.

    libpq expands such a dbname only in ``PQconnectdbParams(expand_dbname=1)``,
    which psycopg does not use: the server is asked for a database of that name,
    and its "does not exist" error (logged by the pool, chained to
    ``PoolTimeout``) would quote the password.
    """
    if not isinstance(dbname, str) or not ("=" in dbname or dbname.startswith(_URL_PREFIXES)):
        return
    try:
        inner = conninfo_to_dict(dbname)
    except Exception:
        return  # not a connection string: an odd name, passed on as it is
    if inner.get("password"):
        raise ValueError(_DBNAME_PROBLEM)


def _find_any(text: str, chars: str, start: int) -> int:
    """The index of the first of ``chars`` in ``text`` from ``start``; ``len(text)`` if none."""
    for i in range(start, len(text)):
        if text[i] in chars:
            return i
    return len(text)


def _scan_hosts(rest: str, i: int) -> tuple[int, list[str]]:
    """libpq's loop over ``host[:port]`` pairs from ``rest[i]``: where it ends, and the ports."""
    ports: list[str] = []
    while True:
        if rest[i : i + 1] == "[":
            close = rest.find("]", i)
            i = len(rest) if close < 0 else close + 1
        else:
            i = _find_any(rest, ":/?,", i)
        if rest[i : i + 1] == ":":
            end = _find_any(rest, "/?,", i + 1)
            ports.append(rest[i + 1 : end])
            i = end
        if rest[i : i + 1] != ",":
            return i, ports
        i += 1


def _is_port(port: str) -> bool:
    """An empty port (libpq's default) or a number, as libpq reads it (percent-decoded)."""
    if not port:
        return True
    value = unquote(port).strip()
    return value.isascii() and value.isdigit()


def _check_kwargs(kwargs: object) -> dict[str, Any]:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"kwargs must be a mapping, got {type(kwargs).__name__}")
    return dict(kwargs)


def service_keys(service: str) -> frozenset[str]:
    """The keywords a connection service file's definition of ``service`` sets.

    Where libpq looks (``PGSERVICEFILE`` or ``~/.pg_service.conf``, then
    ``PGSYSCONFDIR/pg_service.conf``); nothing when it is not found there (libpq's
    compiled-in system directory is not known here). Values are never read.
    """
    files = []
    with contextlib.suppress(RuntimeError):  # no home directory to be found
        files.append(os.environ.get("PGSERVICEFILE") or str(Path.home() / ".pg_service.conf"))
    if os.environ.get("PGSYSCONFDIR"):
        files.append(os.path.join(os.environ["PGSYSCONFDIR"], "pg_service.conf"))
    for name in files:
        # No [DEFAULT] section: libpq has none (configparser's would apply to every one).
        parser = configparser.ConfigParser(interpolation=None, strict=False, default_section="")
        try:
            parser.read(name, encoding="utf-8")
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue
        if parser.has_section(service):
            return frozenset(parser.options(service))
    return frozenset()


class ConnectTarget:
    """The arguments of ``connect()`` for one pool, static or produced per attempt."""

    __slots__ = ("_conninfo", "_kwargs", "_name", "_static", "wants_primary", "wants_read_write")

    def __init__(self, conninfo: str | Callable[[], Any], kwargs: Any, name: str) -> None:
        self._conninfo = conninfo
        self._kwargs = kwargs
        self._name = name
        self._static: tuple[str, dict[str, Any]] | None = None
        #: The conninfo asks for a writable primary (``target_session_attrs``):
        #: the pool then follows role changes (a callable conninfo: its kwargs decide).
        self.wants_primary = False
        #: ... and one that is not read-only (``read-write``): a server made read-only
        #: in place counts as a role change too (for ``primary``, only recovery does).
        self.wants_read_write = False
        attrs: object = None
        if not callable(conninfo) and not callable(kwargs):
            self._static = self._finish(conninfo, kwargs)
            params = {**parse_conninfo(self._static[0]), **self._static[1]}
            attrs = params.get("target_session_attrs")
        elif not callable(kwargs) and kwargs:
            attrs = kwargs.get("target_session_attrs")
        self.wants_primary = attrs in _PRIMARY_ATTRS
        self.wants_read_write = attrs == "read-write"

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
        check_dbname(out["dbname"] if "dbname" in out else params.get("dbname"))
        # What the user set wins: in the conninfo, in kwargs, in its service's definition
        # (which libpq reads after these keywords, so a default here would override it)
        # or, for application_name, in the environment.
        service = out.get("service") or params.get("service") or os.environ.get("PGSERVICE")
        given = {*params, *out, *service_keys(service)} if service else {*params, *out}
        if "application_name" not in given and not os.environ.get("PGAPPNAME"):
            out["application_name"] = self._name
        if _KEEPALIVE_KEYS.isdisjoint(given):
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
        # Refused at construction; should one ever get here, its host, port and dbname
        # may be pieces of the password: nothing parsed from it is shown.
        malformed = url_problem(conninfo) is not None
        if malformed:
            params = {}
        params.update(kwargs)
        parts = [
            f"{key}={_shown(key, params[key])}"
            for key in _SHOWN_KEYS
            if params.get(key) not in (None, "")
        ]
        if malformed:
            parts.insert(0, "(a malformed URL)")
        return " ".join(parts) or "(default target)"


def _shown(key: str, value: object) -> object:
    """``value`` as a description shows it: a ``dbname`` that is itself a connection string
    (libpq expands one with ``=`` or a URI scheme) may carry a password, and is not shown;
    nor is a host or port with an ``@`` (but for an abstract socket's leading one: no real
    host or port has it, a piece of a user name or password may)."""
    if not isinstance(value, str):
        return value
    if key == "dbname" and ("=" in value or value.startswith(_URL_PREFIXES)):
        return "(a connection string)"
    if key in ("host", "hostaddr", "port") and not all(_is_host(v) for v in value.split(",")):
        return "(not shown)"
    return value
