"""Test support for aiopgpool: throwaway PostgreSQL servers (and, in ``aiopgpool.testing.proxy``,
a TCP proxy to cut a pool off from its server).

Used by aiopgpool's own test suite and benchmarks, and usable in yours: :func:`provide_server`
gives a session's server (``$AIOPGPOOL_TEST_DSN``, a Docker container, or a cluster made from
the local server binaries), :func:`private_server` / :func:`local_cluster` a server of your own
that you may stop, start and restart, and :func:`count_backends` / :func:`terminate_backends`
look at and kill a pool's backends by ``application_name``.  Needs the ``testing`` extra
(``pip install 'aiopgpool[testing]'``).
"""

from aiopgpool.testing.server import (
    BASE_SETTINGS,
    DEFAULT_ENV_VAR,
    ContainerServer,
    ExternalServer,
    LocalCluster,
    NoServerAvailable,
    PostgresServer,
    count_backends,
    docker_available,
    find_pg_bindir,
    how_to_provide_server,
    local_cluster,
    private_server,
    provide_server,
    terminate_backends,
)

__all__ = [
    "BASE_SETTINGS",
    "DEFAULT_ENV_VAR",
    "ContainerServer",
    "ExternalServer",
    "LocalCluster",
    "NoServerAvailable",
    "PostgresServer",
    "count_backends",
    "docker_available",
    "find_pg_bindir",
    "how_to_provide_server",
    "local_cluster",
    "private_server",
    "provide_server",
    "terminate_backends",
]
