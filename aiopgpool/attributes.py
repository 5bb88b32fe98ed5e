"""The read-only attributes every public pool shows, read from its core (written once)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core import PoolCore

__all__ = ["PoolAttributes"]


class PoolAttributes:
    """``name``, the sizes, ``closed`` and the option attributes, for a class with a ``_core``."""

    _core: PoolCore[Any]

    @property
    def name(self) -> str:
        """The pool's name (logs, stats, application_name)."""
        return self._core.name

    @property
    def min_size(self) -> int:
        """The number of connections the pool keeps open, idle or not."""
        return self._core.min_size

    @property
    def max_size(self) -> int:
        """The most connections the pool opens at once (0: no bound, null pools only)."""
        return self._core.max_size

    @property
    def closed(self) -> bool:
        """True unless the pool is open: before ``open()`` and once closed."""
        return self._core.closed

    @property
    def timeout(self) -> float | None:
        """The default wait of ``getconn()`` and ``connection()``."""
        return self._core.timeout

    @property
    def max_waiting(self) -> int:
        """The most requests queued at once (0: no bound)."""
        return self._core.max_waiting

    @property
    def max_idle(self) -> float | None:
        """Idle connections above ``min_size`` close after this many seconds."""
        return self._core.max_idle

    @property
    def max_lifetime(self) -> float | None:
        """A connection is replaced after this age, when next idle."""
        return self._core.max_lifetime

    @property
    def reconnect_timeout(self) -> float | None:
        """How long failed connects are retried before ``reconnect_failed``."""
        return self._core.reconnect_timeout

    @property
    def leak_timeout(self) -> float | None:
        """A connection held longer than this is reported (None: off)."""
        return self._core.leak_timeout

    @property
    def close_returns(self) -> bool:
        """True when ``conn.close()`` on a borrowed connection gives it back."""
        return self._core.options.close_returns
