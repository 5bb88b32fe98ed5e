"""The second provider: the official ``postgres`` image run by testcontainers, when a
Docker daemon answers (:func:`docker_available`)."""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from aiopgpool.testing.base import BASE_SETTINGS, PostgresServer, accepts_connections
from aiopgpool.testing.process import (
    SERVER_USER,
    pick_port,
    port_accepting,
    release_port,
    wait_until,
)

__all__ = ["HOW_TO", "ContainerServer", "docker_available"]

log = logging.getLogger("aiopgpool.testing")

HOW_TO = (
    "start a Docker daemon (`docker info` must work; set DOCKER_HOST if it does not"
    " listen on /var/run/docker.sock): a postgres container is then started with"
    " testcontainers"
)
"""How to use this provider."""

_DOCKER_IMAGE_ENV = "AIOPGPOOL_TEST_IMAGE"
_DEFAULT_IMAGE = "postgres:16-alpine"
_DOCKER_SOCKET = "/var/run/docker.sock"


def docker_available(timeout: float = 3.0) -> bool:
    """True when a Docker daemon answers a ping within ``timeout`` seconds; never raises.

    Uses ``DOCKER_HOST`` if set, else ``/var/run/docker.sock`` (returns False at once
    when neither exists).
    """
    try:
        if not os.environ.get("DOCKER_HOST") and not os.path.exists(_DOCKER_SOCKET):
            return False
        answer: list[bool] = []

        def ping() -> None:
            try:
                docker = importlib.import_module("docker")
                client = docker.from_env(timeout=max(1, int(timeout)))
                try:
                    answer.append(bool(client.ping()))
                finally:
                    client.close()
            except Exception as exc:
                log.debug("no Docker daemon: %s", exc)
                answer.append(False)

        thread = threading.Thread(target=ping, name="aiopgpool-docker-ping", daemon=True)
        thread.start()
        thread.join(timeout)
        return bool(answer and answer[0])
    except Exception:
        return False


def _postgres_container_class() -> Any:
    for module in ("testcontainers.community.postgres", "testcontainers.postgres"):
        try:
            base: Any = importlib.import_module(module).PostgresContainer
        except ImportError:
            continue

        class TrustPostgresContainer(base):  # type: ignore[misc]
            """PostgresContainer with trust authentication and no password at all."""

            def _configure(self) -> None:
                super()._configure()
                env = getattr(self, "env", None)
                if isinstance(env, dict):
                    env.pop("POSTGRES_PASSWORD", None)
                    env["POSTGRES_HOST_AUTH_METHOD"] = "trust"

        return TrustPostgresContainer
    raise RuntimeError(
        "testcontainers[postgres] is not installed (pip install 'aiopgpool[testing]')"
    )


class ContainerServer(PostgresServer):
    """The official ``postgres`` image run by testcontainers, on a fixed free host port.

    Trust authentication (``POSTGRES_HOST_AUTH_METHOD=trust``), :data:`BASE_SETTINGS`
    plus ``settings`` as server options.  Controllable: :meth:`stop` stops the
    container (the image's stop signal, SIGINT, is a fast shutdown) and :meth:`start`
    starts it again with the same port and data.  The image is
    ``$AIOPGPOOL_TEST_IMAGE`` or ``postgres:16-alpine``.
    """

    controllable = True

    def __init__(
        self,
        settings: Mapping[str, str] | None = None,
        *,
        image: str | None = None,
        startup_timeout: float = 120.0,
    ) -> None:
        container_class = _postgres_container_class()
        self.image = image or os.environ.get(_DOCKER_IMAGE_ENV) or _DEFAULT_IMAGE
        self.startup_timeout = startup_timeout
        self.settings = {**BASE_SETTINGS, **{k: str(v) for k, v in (settings or {}).items()}}
        command = ["postgres"]
        for name, value in self.settings.items():
            command += ["-c", f"{name}={value}"]
        host_port = self._host_port = pick_port()
        container = container_class(
            self.image, username=SERVER_USER, dbname=SERVER_USER, driver=None
        )
        container.with_env("POSTGRES_HOST_AUTH_METHOD", "trust")
        container.with_bind_ports(5432, host_port)
        container.with_command(command)
        self._container: Any = container
        self._closed = False
        try:
            container.start()
            self.host = str(container.get_container_host_ip())
            self.port = int(container.get_exposed_port(5432))
            if not wait_until(lambda: accepts_connections(self.dsn), startup_timeout, 0.2):
                raise RuntimeError(f"the {self.image} container does not accept connections")
        except BaseException:
            self._remove()
            raise

    def stop(self) -> None:
        """Stop the container (fast shutdown); return once the port is closed."""
        self._container.get_wrapped_container().stop(timeout=30)
        wait_until(lambda: not port_accepting(self.host, self.port), 10.0, 0.1)

    def start(self) -> None:
        """Start the container again; return once it accepts connections."""
        wrapped = self._container.get_wrapped_container()
        wrapped.reload()
        if wrapped.status != "running":
            wrapped.start()
        if not wait_until(lambda: accepts_connections(self.dsn), self.startup_timeout, 0.2):
            raise RuntimeError(f"the {self.image} container did not come back")

    def close(self) -> None:
        """Remove the container (idempotent)."""
        if not self._closed:
            self._closed = True
            self._remove()

    def _remove(self) -> None:
        release_port(self._host_port)
        try:
            self._container.stop()
        except Exception as exc:
            log.warning("removing the postgres container failed: %s", exc)
