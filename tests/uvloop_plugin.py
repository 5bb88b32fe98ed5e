"""Run every async test on uvloop as well as on asyncio's own loop (pytest-asyncio >= 1.1).

A pytest plugin implementing pytest-asyncio's ``pytest_asyncio_loop_factories`` hook:
each async test is parametrized over the chosen loops (ids ``[asyncio]``, ``[uvloop]``).
Sync tests are untouched (the sync pools run their own loop in their own thread).

Enable it with ``-p uvloop_plugin`` (the ``tests`` folder on the import path), e.g.::

    PYTHONPATH=tests nox -s tests -- -p uvloop_plugin tests/test_core_checkout.py

or for good with one line in ``tests/conftest.py``: ``pytest_plugins = ["uvloop_plugin"]``.

Which loops: ``--event-loops=asyncio,uvloop`` (the default), or the environment's
``AIOPGPOOL_TEST_LOOPS``; ``--event-loops=uvloop`` runs on uvloop only. Asking for uvloop
where it is not installed (Windows) is a usage error, not a silent skip.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping

import pytest

LOOPS: dict[str, str] = {"asyncio": "asyncio's own event loop", "uvloop": "uvloop"}


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--event-loops``: the loops every async test runs on."""
    parser.addoption(
        "--event-loops",
        default=os.environ.get("AIOPGPOOL_TEST_LOOPS", "asyncio,uvloop"),
        help="comma-separated event loops for async tests: asyncio, uvloop "
        "(default: $AIOPGPOOL_TEST_LOOPS or both)",
    )


def _factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        raise pytest.UsageError("--event-loops asks for uvloop, which is not installed") from None
    return uvloop.new_event_loop


def _chosen(config: pytest.Config) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    names = [n.strip() for n in str(config.getoption("--event-loops")).split(",") if n.strip()]
    unknown = [n for n in names if n not in LOOPS]
    if unknown or not names:
        raise pytest.UsageError(f"--event-loops: unknown {unknown}, choose among {list(LOOPS)}")
    return {name: _factory(name) for name in names}


def pytest_configure(config: pytest.Config) -> None:
    """Check the choice once, up front."""
    config.stash[_KEY] = _chosen(config)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The loops each async test is run on."""
    loops: dict[str, Callable[[], asyncio.AbstractEventLoop]] = config.stash[_KEY]
    return loops


_KEY = pytest.StashKey[dict[str, Callable[[], asyncio.AbstractEventLoop]]]()
