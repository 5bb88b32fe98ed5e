"""Validation of pool options, pool naming, and password-free conninfo handling."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

from psycopg.conninfo import conninfo_to_dict

__all__ = ["check_sizes", "check_timeout", "describe_target", "make_name", "prepare_connect_kwargs"]

_counter = itertools.count(1)

# Keys of a conninfo worth showing in a repr or a log line.
_SHOWN_KEYS = ("host", "hostaddr", "port", "dbname", "user")


def make_name(name: str | None) -> str:
    """Return ``name``, or the next default ``pool-N``."""
    if name is None:
        return f"pool-{next(_counter)}"
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    return name


def check_sizes(min_size: int, max_size: int, *, allow_zero_max: bool = False) -> None:
    """Raise ValueError naming what is wrong with ``min_size``/``max_size``."""
    for label, value in (("min_size", min_size), ("max_size", max_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{label} must be an integer, got {value!r}")
        if value < 0:
            raise ValueError(f"{label} must be >= 0, got {value}")
    if max_size == 0 and not allow_zero_max:
        raise ValueError("max_size must be >= 1, got 0")
    if min_size > max_size:
        raise ValueError(f"min_size ({min_size}) must not be greater than max_size ({max_size})")


def check_timeout(label: str, value: float | None, *, allow_none: bool = True) -> float | None:
    """Validate a duration in seconds: a finite number >= 0 (or None where allowed)."""
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{label} must be a number of seconds, got None")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{label} must be a number of seconds, got {value!r}")
    if math.isnan(value) or value < 0:
        raise ValueError(f"{label} must be >= 0, got {value!r}")
    return float(value)


def _parse(conninfo: str) -> dict[str, Any]:
    if not isinstance(conninfo, str):
        raise ValueError(f"conninfo must be a string, got {type(conninfo).__name__}")
    try:
        return conninfo_to_dict(conninfo)
    except Exception:
        # libpq's message may quote the string, password included: do not chain it.
        raise ValueError("conninfo is not a valid libpq connection string or URL") from None


def prepare_connect_kwargs(
    conninfo: str, kwargs: Mapping[str, Any] | None, name: str
) -> dict[str, Any]:
    """Return the keyword arguments for ``connect()``, with ``application_name`` defaulted.

    The pool's ``name`` becomes ``application_name`` unless the conninfo or the
    kwargs set one, so a pool's backends can be found in ``pg_stat_activity``.
    """
    params = _parse(conninfo)
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ValueError(f"kwargs must be a mapping, got {type(kwargs).__name__}")
    out = dict(kwargs or {})
    if "application_name" not in params and "application_name" not in out:
        out["application_name"] = name
    return out


def describe_target(conninfo: str, kwargs: Mapping[str, Any] | None) -> str:
    """A password-free description of where the pool connects, for reprs and logs."""
    try:
        params = conninfo_to_dict(conninfo)
    except Exception:
        params = {}
    params.update(kwargs or {})
    parts = [f"{key}={params[key]}" for key in _SHOWN_KEYS if params.get(key) not in (None, "")]
    return " ".join(parts) or "(default target)"
