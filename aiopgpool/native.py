"""Which form of the hot-path modules runs: compiled by mypyc, or pure Python.

The build (``setup.py``) compiles the modules in :data:`MODULES` where it can and
records the digest of each source it compiled. At import, before any of them
loads, :func:`choose` keeps the compiled modules only if every one of them is there
and its source is the one compiled; otherwise (``AIOPGPOOL_PURE_PYTHON`` set, no
build, a source edited since) a finder placed first on ``sys.meta_path`` makes
all of them load from their ``.py`` files. All or none: compiled modules call
each other's classes directly, so they cannot be mixed with Python ones.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Sequence
from importlib.machinery import EXTENSION_SUFFIXES, ModuleSpec
from pathlib import Path
from types import ModuleType

__all__ = ["COMPILED", "MODULES", "REASON", "choose", "form"]

logger = logging.getLogger("aiopgpool")

#: The modules setup.py compiles (the hot paths and what they call).
MODULES = ("core", "slot", "waiting", "threadport", "stats", "admission")
_PACKAGE = Path(__file__).parent
_STAMP = _PACKAGE / "_compiled.json"


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Finds the listed modules' ``.py`` files, ahead of the compiled ones beside them."""

    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = paths

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        source = self.paths.get(fullname)
        return None if source is None else importlib.util.spec_from_file_location(fullname, source)


def _why_pure() -> str | None:
    """None when the compiled modules are present and current, else why they are not used.

    A compiled build that cannot be used (a source edited since, an unreadable
    file) is also logged as a warning: the code would not run as built.
    """
    if os.environ.get("AIOPGPOOL_PURE_PYTHON"):
        return "AIOPGPOOL_PURE_PYTHON is set"
    if not _STAMP.is_file():
        return "not compiled"
    try:
        digests = json.loads(_STAMP.read_text())
    except (OSError, ValueError) as exc:
        return _warned(f"unreadable {_STAMP.name}: {exc}")
    for name in MODULES:
        if not _has_extension(name):
            return f"not compiled for this Python ({name} has no {EXTENSION_SUFFIXES[0]})"
        source = _PACKAGE / f"{name}.py"
        try:
            current = hashlib.sha256(source.read_bytes()).hexdigest()
        except OSError as exc:
            return _warned(f"unreadable {source.name}: {exc}")
        if digests.get(name) != current:
            return _warned(f"{source.name} changed since it was compiled (reinstall to compile)")
    return None


def _has_extension(name: str) -> bool:
    """Whether module ``name`` has a compiled file for this Python beside its source."""
    return any((_PACKAGE / f"{name}{suffix}").is_file() for suffix in EXTENSION_SUFFIXES)


def _warned(reason: str) -> str:
    logger.warning("aiopgpool: loading the pure-Python modules: %s", reason)
    return reason


def choose() -> tuple[bool, str]:
    """Decide, once, which form loads; ``(compiled, reason)``."""
    reason = _why_pure()
    if reason is None:
        return True, "compiled by mypyc"
    # Only compiled files could shadow the sources: without any, the usual import finds
    # the .py files, and no finder of ours sits in front of every import.
    if any(_has_extension(name) for name in MODULES):
        paths = {f"{__package__}.{name}": _PACKAGE / f"{name}.py" for name in MODULES}
        if not any(isinstance(f, _SourceFinder) and f.paths == paths for f in sys.meta_path):
            sys.meta_path.insert(0, _SourceFinder(paths))
    return False, reason


def form() -> str:
    """The form that runs, for headers and reports: compiled, or pure Python and why."""
    return "compiled by mypyc" if COMPILED else f"pure Python ({REASON})"


#: True when the hot paths run compiled; :data:`REASON` says why or why not.
COMPILED, REASON = choose()
