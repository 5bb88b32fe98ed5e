"""Every option a pool shares, with its default and its validation, written once.

Each public constructor (async, sync, null, the drop-ins, both psycopg2
flavours, ``config_pool``) keeps an explicit signature, whose defaults are
read from :data:`DEFAULTS`, and builds one :class:`PoolOptions`; a test
checks that the signatures and this class agree.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["DEFAULTS", "PoolOptions", "check_key", "check_timeout", "make_name"]

_counter = itertools.count(1)


def make_name(name: str | None) -> str:
    """Return ``name``, or the next default ``pool-N``."""
    if name is None:
        return f"pool-{next(_counter)}"
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    return name


def check_timeout(label: str, value: object, *, allow_none: bool = True) -> float | None:
    """Validate a duration in seconds: a number >= 0, ``inf`` for ever (or None where allowed)."""
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{label} must be a number of seconds, got None")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{label} must be a number of seconds, got {value!r}")
    try:
        seconds = float(value)
    except OverflowError:
        raise ValueError(f"{label} is too large: {value!r}") from None
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"{label} must be >= 0, got {value!r}")
    return seconds


def check_key(key: Hashable) -> None:
    """Raise TypeError for a key that cannot key a connection (before any slot is taken)."""
    try:
        hash(key)
    except TypeError:
        raise TypeError(f"key must be hashable, got {type(key).__name__}") from None


def check_count(label: str, value: object, *, least: int = 0) -> int:
    """A number of connections (an ``int`` >= ``least``); ValueError naming ``label``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{label} must be an integer, got {value!r}")
    if value < least:
        raise ValueError(f"{label} must be >= {least}, got {value}")
    return value


def check_sizes(min_size: int, max_size: int, *, null: bool = False) -> None:
    """Raise ValueError naming what is wrong with ``min_size``/``max_size``.

    A null pool (one that keeps no idle connection) needs ``min_size`` 0 and
    takes ``max_size`` 0 for "no bound".
    """
    check_count("min_size", min_size)
    check_count("max_size", max_size)
    if null:
        if min_size != 0:
            raise ValueError(f"min_size must be 0 for a null pool, got {min_size}")
        return
    if max_size == 0:
        raise ValueError("max_size must be >= 1, got 0")
    if min_size > max_size:
        raise ValueError(f"min_size ({min_size}) must not be greater than max_size ({max_size})")


def _check_callable(label: str, value: object) -> None:
    if value is not None and not callable(value):
        raise ValueError(f"{label} must be callable, got {type(value).__name__}")


@dataclass(frozen=True, slots=True)
class PoolOptions:
    """The options of one pool, validated (see API.md for each)."""

    conninfo: str | Callable[[], Any] = ""
    kwargs: Any = None
    """A mapping of extra connect() keyword arguments, or a callable returning one."""
    min_size: int = 1
    max_size: int = 10
    timeout: float | None = 30.0
    max_waiting: int = 0
    max_idle: float | None = 600.0
    max_lifetime: float | None = 3600.0
    check: Callable[[Any], Any] | None = None
    configure: Callable[[Any], Any] | None = None
    reset: Callable[[Any], Any] | None = None
    reconnect_timeout: float | None = 300.0
    reconnect_failed: Callable[[Any], Any] | None = None
    leak_timeout: float | None = None
    name: str | None = None
    close_returns: bool = False
    ping_after_idle: float | None = None
    null: bool = False
    """A null pool: no idle connection kept (each return closes)."""

    def __post_init__(self) -> None:
        check_sizes(self.min_size, self.max_size, null=self.null)
        if (
            isinstance(self.max_waiting, bool)
            or not isinstance(self.max_waiting, int)
            or self.max_waiting < 0
        ):
            raise ValueError(f"max_waiting must be an integer >= 0, got {self.max_waiting!r}")
        for label in (
            "timeout",
            "max_idle",
            "max_lifetime",
            "reconnect_timeout",
            "leak_timeout",
            "ping_after_idle",
        ):
            object.__setattr__(self, label, check_timeout(label, getattr(self, label)))
        for label in ("check", "configure", "reset", "reconnect_failed"):
            _check_callable(label, getattr(self, label))
        if not (isinstance(self.conninfo, str) or callable(self.conninfo)):
            raise ValueError(
                f"conninfo must be a string or a callable returning one, "
                f"got {type(self.conninfo).__name__}"
            )
        object.__setattr__(self, "name", make_name(self.name))

    def but(self, **changes: Any) -> PoolOptions:
        """A copy with ``changes`` (validated again)."""
        return replace(self, **changes)


#: The defaults, for the constructors' signatures.
DEFAULTS = PoolOptions(name="defaults")
