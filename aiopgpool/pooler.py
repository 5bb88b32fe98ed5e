"""Is a connection pooler (PgBouncer) between a new connection and its server?

A pooler gives its clients a backend key of its own, so the pid libpq got at
startup differs from ``pg_backend_pid()`` as the server answers it. Asking
costs a round trip before a new connection's first use (README: "The cold
burst and the pooler question" says what that measured), so:

- the answer for an endpoint (host, address and port, as libpq reports them)
  serves every new connection to it, in any pool of this process, for
  :data:`ANSWER_TTL` seconds;
- while one connection asks, the others to the same endpoint wait for its
  answer (up to :data:`QUESTION_WAIT` seconds) instead of asking too. If it
  fails or is too slow, each asks for itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from time import monotonic
from typing import Any

import psycopg

from .deadlines import move_on_after

__all__ = [
    "ANSWER_TTL",
    "BACKEND_PID_QUERY",
    "QUESTION_WAIT",
    "endpoint",
    "through_pooler_async",
    "through_pooler_blocking",
]

# Never prepared (prepare=False): behind a transaction-mode pooler, a caller's
# prepare_threshold=0 would prepare it on one server connection and fail the
# next connect on that name.
BACKEND_PID_QUERY = "SELECT pg_backend_pid()"
#: Seconds for which an endpoint's answer serves new connections.
ANSWER_TTL = 60.0
#: Seconds a new connection waits for another one's question to the same
#: endpoint before it asks for itself.
QUESTION_WAIT = 5.0

Endpoint = tuple[str, str, str]

# endpoint -> (a pooler is in between, answer valid until: time.monotonic()).
_answers: dict[Endpoint, tuple[bool, float]] = {}
# endpoint -> the answer of the connection asking now. Completed with a result
# or with Unanswered, never cancelled: every waiter sees the same outcome.
# Emptied in a child of fork() (see _forget_questions).
_questions: dict[Endpoint, Future[bool]] = {}


def _forget_questions() -> None:
    """In a child of ``os.fork()``: the parent's questions in flight are never answered
    here (their askers are the parent's threads), so none is waited for.

    The answers stay: whether a pooler is in between is a fact about the endpoint,
    as true in the child as in the parent until it expires (``time.monotonic`` is
    the system's clock, shared by both).
    """
    _questions.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_questions)


class Unanswered(Exception):
    """The connection asking failed before it had the answer."""


def endpoint(conn: psycopg.BaseConnection[Any]) -> Endpoint:
    """Where ``conn`` went: host, address (when libpq knows it) and port, as libpq says."""
    pgconn = conn.pgconn
    try:
        address = pgconn.hostaddr.decode()
    except psycopg.NotSupportedError:  # libpq < 12
        address = ""
    return pgconn.host.decode(), address, pgconn.port.decode()


def _known(key: Endpoint) -> bool | None:
    known = _answers.get(key)
    if known is not None and known[1] >= monotonic():
        return known[0]
    return None


class _Asking:
    """This connection asks (a context manager): the others to its endpoint may wait for its
    answer, and learn that it failed if the block raises."""

    __slots__ = ("_key", "_question", "_registered")

    def __init__(self, key: Endpoint) -> None:
        self._key = key
        self._question: Future[bool] = Future()
        # Another connection may have started asking just now (a thread): then
        # this one asks on its own, and nobody waits for it.
        self._registered = _questions.setdefault(key, self._question) is self._question

    def __enter__(self) -> _Asking:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._registered:
            self._registered = False
            # Gone if this thread forked meanwhile (the child forgot the questions).
            if _questions.get(self._key) is self._question:
                del _questions[self._key]
        if not self._question.done():
            self._question.set_exception(Unanswered())

    def answered(self, conn: psycopg.BaseConnection[Any], row: Any) -> bool:
        """The answer, from ``pg_backend_pid()``'s ``row``: remembered and passed on."""
        through = (row or (0,))[0] != conn.pgconn.backend_pid
        _answers[self._key] = (through, monotonic() + ANSWER_TTL)
        self._question.set_result(through)
        return through


async def through_pooler_async(conn: psycopg.AsyncConnection[Any]) -> bool:
    """True when a pooler stands between ``conn`` and its server (see the module)."""
    key = endpoint(conn)
    answer = _known(key)
    if answer is None and (question := _questions.get(key)) is not None:
        answer = await _wait_async(question)
    if answer is not None:
        return answer
    with _Asking(key) as asking:
        autocommit = conn.autocommit
        await conn.set_autocommit(True)
        cur = await conn.execute(BACKEND_PID_QUERY, prepare=False)
        row = await cur.fetchone()
        await conn.set_autocommit(autocommit)
        return asking.answered(conn, row)


def through_pooler_blocking(conn: psycopg.Connection[Any]) -> bool:
    """:func:`through_pooler_async` for a sync connection (blocking)."""
    key = endpoint(conn)
    answer = _known(key)
    if answer is None and (question := _questions.get(key)) is not None:
        with contextlib.suppress(Unanswered, FutureTimeout):
            answer = question.result(QUESTION_WAIT)
    if answer is not None:
        return answer
    with _Asking(key) as asking:
        autocommit = conn.autocommit
        conn.autocommit = True
        row = conn.execute(BACKEND_PID_QUERY, prepare=False).fetchone()
        conn.autocommit = autocommit
        return asking.answered(conn, row)


async def _wait_async(question: Future[bool]) -> bool | None:
    """The answer of ``question`` (completed in any thread); None: ask for yourself."""
    loop = asyncio.get_running_loop()
    # None: unanswered. Never an exception, which nobody might retrieve.
    relayed: asyncio.Future[bool | None] = loop.create_future()

    def relay(done: Future[bool]) -> None:
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
            loop.call_soon_threadsafe(_copy, done, relayed)

    question.add_done_callback(relay)
    with move_on_after(QUESTION_WAIT):
        return await relayed
    return None


def _copy(source: Future[bool], target: asyncio.Future[bool | None]) -> None:
    if not target.done():
        target.set_result(None if source.exception() else source.result())
