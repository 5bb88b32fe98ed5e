"""initdb templates: a data directory made once per process and per set of binaries,
copied for every new cluster (initdb takes about a second; a copy a few milliseconds)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

from aiopgpool.testing.process import (
    DIR_PREFIX,
    SERVER_USER,
    Runner,
    remove_at_exit,
    sweep_stale_dirs,
    temp_parent,
)

__all__ = ["template_data_dir"]

log = logging.getLogger("aiopgpool.testing")


def _supports_small_wal(bindir: Path) -> bool:
    try:
        out = subprocess.run(
            [str(bindir / "initdb"), "--help"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "--wal-segsize" in out


_TEMPLATE_LOCK = threading.Lock()
_TEMPLATES: dict[tuple[str, str | None], Path] = {}


def template_data_dir(bindir: Path, runner: Runner) -> Path:
    """A data directory initdb made once per process (per bindir), to be copied."""
    key = (str(bindir), runner.os_user)
    with _TEMPLATE_LOCK:
        cached = _TEMPLATES.get(key)
        if cached is not None and cached.is_dir():
            return cached
        with contextlib.suppress(OSError):
            sweep_stale_dirs(temp_parent())
        base, lock_fd = runner.private_dir(DIR_PREFIX + "template-")
        data = base / "data"
        argv = [
            str(bindir / "initdb"),
            "-D",
            str(data),
            "--auth=trust",
            "-U",
            SERVER_USER,
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]
        if _supports_small_wal(bindir):
            argv.append("--wal-segsize=1")  # 1 MB instead of 16 MB of WAL to copy per cluster
        started = time.monotonic()
        try:
            runner.run(argv, base, f"initdb ({bindir})")
        except BaseException:
            shutil.rmtree(base, ignore_errors=True)
            os.close(lock_fd)
            raise
        remove_at_exit(base)
        log.debug("initdb template %s made in %.2f s", data, time.monotonic() - started)
        _TEMPLATES[key] = data
        return data
