"""The names this module had before it was split by provider; import from
:mod:`aiopgpool.testing` (or the provider modules) instead."""

from aiopgpool.testing.base import (
    BASE_SETTINGS,
    NoServerAvailable,
    PostgresServer,
    count_backends,
    terminate_backends,
)
from aiopgpool.testing.container import ContainerServer, docker_available
from aiopgpool.testing.external import DEFAULT_ENV_VAR, ExternalServer
from aiopgpool.testing.local import LocalCluster, find_pg_bindir, local_cluster
from aiopgpool.testing.providers import how_to_provide_server, private_server, provide_server

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
