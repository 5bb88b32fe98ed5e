"""Jittered exponential backoff for reconnection attempts."""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Delays that double from ``initial`` up to ``maximum``, each with +-``jitter`` spread.

    The cap is small on purpose: a pool whose server comes back (or whose
    standby is promoted) must notice well within a second, not after a
    minute-long sleep; with the jitter an attempt follows the last within 0.6 s.
    """

    __slots__ = ("_delay", "initial", "jitter", "maximum")

    def __init__(self, initial: float = 0.05, maximum: float = 0.5, jitter: float = 0.2) -> None:
        self.initial = initial
        self.maximum = maximum
        self.jitter = jitter
        self._delay = initial

    def next(self) -> float:
        """The next delay in seconds."""
        delay = self._delay
        self._delay = min(self._delay * 2, self.maximum)
        return delay * (1 + self.jitter * (2 * random.random() - 1))

    def reset(self) -> None:
        """Start again from the initial delay."""
        self._delay = self.initial
