"""The first provider: a server somebody else runs, given by a DSN (``$AIOPGPOOL_TEST_DSN``)."""

from __future__ import annotations

import os

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from aiopgpool.testing.base import PostgresServer

__all__ = ["DEFAULT_ENV_VAR", "HOW_TO", "ExternalServer"]

DEFAULT_ENV_VAR = "AIOPGPOOL_TEST_DSN"
"""The environment variable :func:`~aiopgpool.testing.provide_server` reads a server's DSN from."""

HOW_TO = (
    "set {env_var} to the libpq DSN of a server the tests may use, e.g."
    " {env_var}='host=127.0.0.1 port=5432 user=postgres dbname=postgres'"
    " (a superuser is best: the tests terminate their own backends)"
)
"""How to use this provider (``{env_var}`` is filled in)."""


class ExternalServer(PostgresServer):
    """A server run by somebody else, known by its DSN (libpq conninfo or URL).

    It is never stopped, started or closed from here (``controllable`` is False).
    ``host`` and ``port`` are the first ones the DSN names (libpq defaults otherwise).
    """

    controllable = False

    def __init__(self, dsn: str) -> None:
        params = conninfo_to_dict(dsn)  # also validates it
        is_url = dsn.lstrip().startswith(("postgresql://", "postgres://"))
        self._dsn = make_conninfo("", **params) if is_url else dsn.strip()
        host = str(params.get("host") or params.get("hostaddr") or os.environ.get("PGHOST", ""))
        port = str(params.get("port") or os.environ.get("PGPORT", "") or "5432")
        self.host = host.split(",")[0] or "localhost"
        self.port = int(port.split(",")[0] or "5432")

    @property
    def dsn(self) -> str:
        """The DSN as given, as a libpq conninfo string."""
        return self._dsn
