"""The pooler question (aiopgpool.pooler): one connection to an endpoint asks, those opening
meanwhile wait for its answer, and each asks for itself when that answer does not come.

Against the shared server, no pooler in between: the question's answer is "direct". What a
pooler changes is tested in test_pgbouncer.py.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import psycopg
import pytest
from helpers import PoolerQuestionsAsync, PoolerQuestionsSync, run_python, unique_name

from aiopgpool import AsyncConnectionPool, ConnectionPool, pooler


@pytest.fixture
def endpoint(dsn: str) -> Iterator[pooler.Endpoint]:
    """The shared server's endpoint, with no answer and no question about it to start with."""
    with psycopg.connect(dsn) as conn:
        key = pooler.endpoint(conn)
    pooler._answers.clear()
    PoolerQuestionsAsync.asked = PoolerQuestionsSync.asked = 0
    yield key
    pooler._questions.pop(key, None)
    pooler._answers.clear()


async def test_connections_opening_together_ask_once(dsn: str, endpoint: Any) -> None:
    """``open(wait=True)`` with min_size=5 connects 5 at once: one asks, four wait for it."""
    async with AsyncConnectionPool(
        dsn, name=unique_name("pooler-once"), min_size=5, connection_class=PoolerQuestionsAsync
    ) as pool:
        await pool.wait(10.0)
        assert pool.stats().size == 5
    assert PoolerQuestionsAsync.asked == 1
    assert pooler._answers[endpoint][0] is False
    assert endpoint not in pooler._questions


def test_sync_connections_opening_together_ask_once(dsn: str, endpoint: Any) -> None:
    with ConnectionPool(
        dsn, name=unique_name("pooler-once-sync"), min_size=5, connection_class=PoolerQuestionsSync
    ) as pool:
        pool.wait(10.0)
        assert pool.stats().size == 5
    assert PoolerQuestionsSync.asked == 1
    assert endpoint not in pooler._questions


def _in_flight(endpoint: Any) -> Future[bool]:
    """A question about ``endpoint`` that another connection is asking now."""
    question: Future[bool] = Future()
    pooler._questions[endpoint] = question
    return question


@pytest.mark.parametrize("outcome", ["pooler", "unanswered"])
async def test_a_new_connection_takes_the_answer_in_flight(
    dsn: str, endpoint: Any, outcome: str
) -> None:
    """Answered by the other connection (here: "a pooler"), it is taken as is; unanswered
    (the asker failed), the new connection asks for itself."""
    question = _in_flight(endpoint)

    def answer() -> None:
        if outcome == "pooler":
            question.set_result(True)
        else:
            question.set_exception(pooler.Unanswered())

    timer = threading.Timer(0.2, answer)  # from another thread, as a sync pool's would
    timer.start()
    try:
        async with AsyncConnectionPool(
            dsn, name=unique_name("pooler-taken"), min_size=1, connection_class=PoolerQuestionsAsync
        ) as pool:
            await pool.wait(10.0)  # the one connection: a checkout now makes no other
            async with pool.connection(10.0) as conn:
                threshold = conn.prepare_threshold
    finally:
        timer.join()
    if outcome == "pooler":
        assert (threshold, PoolerQuestionsAsync.asked) == (None, 0)  # adapted, without asking
    else:
        assert (threshold, PoolerQuestionsAsync.asked) == (5, 1)  # psycopg's default: direct


@pytest.mark.parametrize("outcome", ["pooler", "unanswered"])
def test_a_new_sync_connection_takes_the_answer_in_flight(
    dsn: str, endpoint: Any, outcome: str
) -> None:
    question = _in_flight(endpoint)
    timer = threading.Timer(
        0.2,
        question.set_result if outcome == "pooler" else question.set_exception,
        args=(True if outcome == "pooler" else pooler.Unanswered(),),
    )
    timer.start()
    try:
        with ConnectionPool(
            dsn,
            name=unique_name("pooler-taken-sync"),
            min_size=1,
            connection_class=PoolerQuestionsSync,
        ) as pool:
            pool.wait(10.0)
            with pool.connection(10.0) as conn:
                threshold = conn.prepare_threshold
    finally:
        timer.join()
    expected = (None, 0) if outcome == "pooler" else (5, 1)
    assert (threshold, PoolerQuestionsSync.asked) == expected


@pytest.mark.parametrize("facade", ["async", "sync"])
async def test_a_question_that_takes_too_long_is_asked_again(
    dsn: str, endpoint: Any, monkeypatch: pytest.MonkeyPatch, facade: str
) -> None:
    """The connection asking is stuck (its server connection hangs): after QUESTION_WAIT the
    new connection asks for itself, and its answer serves the next ones."""
    monkeypatch.setattr(pooler, "QUESTION_WAIT", 0.2)
    _in_flight(endpoint)  # never answered
    name = unique_name(f"pooler-stuck-{facade}")
    if facade == "async":
        async with AsyncConnectionPool(
            dsn, name=name, min_size=2, connection_class=PoolerQuestionsAsync
        ) as pool:
            await pool.wait(10.0)
        asked = PoolerQuestionsAsync.asked
    else:
        with ConnectionPool(
            dsn, name=name, min_size=2, connection_class=PoolerQuestionsSync
        ) as spool:
            spool.wait(10.0)
        asked = PoolerQuestionsSync.asked
    # Both connections waited for the stuck question, then asked: 2, or 1 when the second
    # one came after the first had its answer.
    assert asked in (1, 2)
    assert pooler._answers[endpoint][0] is False


FORK_SCRIPT = """
import os, sys, threading, traceback
import psycopg
from aiopgpool import ConnectionPool, pooler

dsn = os.environ["AIOPGPOOL_TEST_DSN"]
asking, answer = threading.Event(), threading.Event()


class HeldQuestion(psycopg.Connection):
    def execute(self, query, *args, **kwargs):
        if query == pooler.BACKEND_PID_QUERY:
            asking.set()
            answer.wait(20)  # held until the child is forked
        return super().execute(query, *args, **kwargs)


parent = ConnectionPool(dsn, min_size=1, max_size=2, connection_class=HeldQuestion)
parent.open()
assert asking.wait(20), "the parent's connection never asked"
assert len(pooler._questions) == 1, pooler._questions  # its question is in flight
pid = os.fork()
if pid == 0:
    code = 1
    try:
        assert pooler._questions == {}, pooler._questions
        # A stale question would be waited for (up to QUESTION_WAIT) on every connect until
        # an answer comes: with this one, the open below could only time out.
        pooler.QUESTION_WAIT = 3600.0
        for _ in range(2):  # and again once the answer expired (the child asks itself)
            pooler._answers.clear()
            with ConnectionPool(dsn, min_size=1, max_size=1) as pool:
                pool.wait(10.0)
                with pool.connection(10.0) as conn:
                    assert conn.execute("SELECT 1").fetchone() == (1,)
            assert pooler._questions == {}, pooler._questions
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)
answer.set()
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
parent.wait(10.0)  # the parent's question was answered in the parent
assert pooler._questions == {}, pooler._questions
parent.close()
print("ok", flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_forgets_the_parents_questions_in_flight(dsn: str) -> None:
    """Forked while the parent's first connection asks: in the child nobody will ever
    answer that question, so none is left to wait for, and the child's own connections
    ask for themselves at once."""
    proc = run_python(FORK_SCRIPT, timeout=60, AIOPGPOOL_TEST_DSN=dsn)
    assert proc.stdout.strip() == "ok"
