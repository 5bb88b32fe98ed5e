"""The constructors' explicit signatures agree with :class:`~aiopgpool.options.PoolOptions`.

Every public constructor keeps an explicit signature (for users, IDEs and
type checkers) whose defaults must be :data:`~aiopgpool.options.DEFAULTS`;
these tests catch a default changed in one place only, an option added to
one pool and not its twin, and a public name that is not part of the API.
No server: nothing here connects.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pytest

from aiopgpool import (
    AsyncConnectionPool,
    AsyncNullConnectionPool,
    ConnectionPool,
    NullConnectionPool,
)
from aiopgpool.options import DEFAULTS, PoolOptions

#: Options every pool shares, as PoolOptions names them. ``name`` has no
#: shared default (None: the next "pool-N"), ``null`` is the class's choice.
SHARED = tuple(f.name for f in dataclasses.fields(PoolOptions) if f.name not in ("name", "null"))

#: Constructor parameters that are not PoolOptions fields (psycopg_pool's own).
EXTRA = {"name", "connection_class", "open"}

#: The public names of AsyncConnectionPool (API.md): methods, then attributes.
PUBLIC_API = {
    # methods
    "getconn",
    "putconn",
    "connection",
    "open",
    "close",
    "closeall",
    "wait",
    "resize",
    "check",
    "drain",
    "purge_expired",
    "stats",
    "get_stats",
    "pop_stats",
    "check_connection",
    # attributes
    "closed",
    "name",
    "min_size",
    "max_size",
    "timeout",
    "max_waiting",
    "max_idle",
    "max_lifetime",
    "reconnect_timeout",
    "leak_timeout",
    "close_returns",
}

POOLS = [AsyncConnectionPool, ConnectionPool]
NULL_POOLS = [AsyncNullConnectionPool, NullConnectionPool]


def parameters(cls: type[Any]) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(cls.__init__).parameters)


def public_names(cls: type[Any]) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def test_the_shared_options_are_what_is_expected() -> None:
    # A new PoolOptions field must be thought about here (and in every constructor).
    assert set(SHARED) == {
        "conninfo",
        "kwargs",
        "min_size",
        "max_size",
        "timeout",
        "max_waiting",
        "max_idle",
        "max_lifetime",
        "check",
        "configure",
        "reset",
        "reconnect_timeout",
        "reconnect_failed",
        "leak_timeout",
        "close_returns",
        "ping_after_idle",
    }


@pytest.mark.parametrize("cls", POOLS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("option", SHARED)
def test_every_shared_option_is_a_parameter_with_the_options_default(
    cls: type[Any], option: str
) -> None:
    params = parameters(cls)
    assert option in params, f"{cls.__name__}() does not take {option}"
    param = params[option]
    expected_kind = (
        inspect.Parameter.POSITIONAL_OR_KEYWORD
        if option == "conninfo"  # the one positional argument, as in psycopg_pool
        else inspect.Parameter.KEYWORD_ONLY
    )
    assert param.kind is expected_kind, f"{cls.__name__}({option}=...) is {param.kind}"
    default = getattr(DEFAULTS, option)
    assert param.default == default, (
        f"{cls.__name__}({option}={param.default!r}) but PoolOptions.{option} = {default!r}"
    )


@pytest.mark.parametrize("cls", POOLS, ids=lambda c: c.__name__)
def test_no_parameter_beyond_the_options_and_psycopg_pools_own(cls: type[Any]) -> None:
    params = parameters(cls)
    params.pop("self")
    assert set(params) == set(SHARED) | EXTRA
    assert params["name"].default is None
    assert params["open"].default is False
    assert not any(
        p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        for p in params.values()
    )


def test_the_async_and_sync_pools_take_the_same_options() -> None:
    async_params = parameters(AsyncConnectionPool)
    sync_params = parameters(ConnectionPool)
    assert list(async_params) == list(sync_params)  # same names, same order
    for name, param in async_params.items():
        other = sync_params[name]
        assert param.kind is other.kind, name
        if name != "connection_class":  # psycopg.AsyncConnection vs psycopg.Connection
            assert param.default == other.default, name


@pytest.mark.parametrize("cls", NULL_POOLS, ids=lambda c: c.__name__)
def test_null_pools_default_min_size_to_zero_and_forward_the_rest(cls: type[Any]) -> None:
    params = parameters(cls)
    assert params["min_size"].default == 0
    assert params["min_size"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["conninfo"].default == DEFAULTS.conninfo
    for name, param in params.items():
        # Where a null pool spells an option out, its default is the options' one.
        if name in SHARED and name != "min_size":
            assert param.default == getattr(DEFAULTS, name), name
    # The others go through **options to the non-null constructor, and are taken.
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    pool = cls(**{name: getattr(DEFAULTS, name) for name in SHARED if name != "min_size"})
    assert pool.max_size == DEFAULTS.max_size and pool.closed
    assert issubclass(
        cls, AsyncConnectionPool if cls is AsyncNullConnectionPool else ConnectionPool
    )


@pytest.mark.parametrize("cls", POOLS + NULL_POOLS, ids=lambda c: c.__name__)
def test_a_pool_built_with_no_arguments_has_the_default_options(cls: type[Any]) -> None:
    pool = cls()  # nothing connects (nor starts a thread) before open()
    for option in (
        "max_size",
        "timeout",
        "max_waiting",
        "max_idle",
        "max_lifetime",
        "reconnect_timeout",
        "leak_timeout",
        "close_returns",
    ):
        assert getattr(pool, option) == getattr(DEFAULTS, option), option
    assert pool.min_size == (0 if cls in NULL_POOLS else DEFAULTS.min_size)
    assert pool.closed


def test_the_async_pool_shows_exactly_the_public_api() -> None:
    assert public_names(AsyncConnectionPool) == PUBLIC_API
    assert public_names(AsyncNullConnectionPool) == PUBLIC_API


def test_the_sync_pool_shows_exactly_the_public_api() -> None:
    assert public_names(ConnectionPool) == PUBLIC_API
    assert public_names(NullConnectionPool) == PUBLIC_API
