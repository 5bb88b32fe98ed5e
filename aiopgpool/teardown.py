"""Closing a connection that someone may still be using.

A psycopg call in progress (a query, ``notifies()``) waits on its
connection's socket, and psycopg's wait takes the descriptor off the event
loop and puts it back every 0.1 s. Closing the descriptor under such a call
is never safe:

- uvloop aborts the process when a registration it has staged meets a closed
  descriptor (libuv's epoll flush calls ``abort()``: libuv issue 5130). The
  pool met it as a ``Fatal Python error: Aborted`` while ``close()`` closed
  connections still borrowed.
- asyncio's selector, or a thread's ``poll()``, would then watch whatever
  socket next gets that number: another connection's queries could fail, or
  a thread could read another connection's bytes.

So a connection in use is shut down rather than closed: the call in progress
fails at once with ``psycopg.OperationalError``. Its descriptor is closed when
that call has let go of the connection (psycopg holds ``conn.lock`` through
every call).

A server running a query reads nothing from its client until the query ends,
so a shut-down socket alone would leave the query running there (holding its
locks) to its end. A connection with a query in progress is also sent a
cancel request, from a short-lived thread: it travels on a connection of its
own. Not with psycopg's C implementation on libpq < 17 (see
:func:`cancel_stops_nothing`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
import threading
from collections.abc import Callable
from functools import partial
from time import monotonic
from typing import Any

import psycopg
from psycopg.pq import PollingStatus, TransactionStatus
from psycopg.pq.abc import PGcancel, PGcancelConn

logger = logging.getLogger("aiopgpool")

#: Seconds to wait for the server to take a cancel request.
CANCEL_TIMEOUT = 5.0

#: How long a thread waits for a sync connection's call to let go before it
#: leaves the descriptor to the connection's own finalizer.
LET_GO_TIMEOUT = 300.0

# Tasks closing async connections once free (the loop keeps only weak references).
_pending: set[asyncio.Task[None]] = set()


def shut_down(fileno: int) -> None:
    """Shut a socket down both ways, leaving its descriptor open; never raises."""
    with contextlib.suppress(OSError, ValueError):
        sock = socket.socket(fileno=fileno)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.detach()


def _finish(conn: psycopg.AsyncConnection[Any] | psycopg.Connection[Any]) -> None:
    # pgconn.finish() writes Terminate without blocking and closes the socket;
    # called directly (not conn.close()), so no suspension point interrupts it.
    with contextlib.suppress(Exception):
        conn.pgconn.finish()


def cancel_stops_nothing() -> bool:
    """True if a cancel request can wait on the network without stopping the process.

    libpq >= 17 has a cancel connection that can be waited on without the
    GIL. Older ones have only ``PQcancel``, which blocks until the server
    answers: psycopg's C implementation calls it holding the GIL, so an
    unreachable server stops every thread of the process until TCP gives up.
    Its Python implementation calls it through ctypes, which lets the GIL go.
    """
    return psycopg.capabilities.has_cancel_safe() or psycopg.pq.__impl__ == "python"


def _shut_down(
    conn: psycopg.AsyncConnection[Any] | psycopg.Connection[Any],
) -> Callable[[], None] | None:
    """Shut ``conn``'s socket down; return the cancel request for its query in progress,
    made first (see :func:`_cancel_request`), for the caller to send."""
    request = _cancel_request(conn)
    with contextlib.suppress(Exception):  # already closed: no socket any more
        shut_down(conn.pgconn.socket)
    return request


def _cancel_request(
    conn: psycopg.AsyncConnection[Any] | psycopg.Connection[Any],
) -> Callable[[], None] | None:
    """What sends a cancel request for the query ``conn`` runs on its server; None if it
    runs none, or if sending one could stop the process (see
    :func:`cancel_stops_nothing`).

    Made before the socket is shut down: once the query in progress reads
    the end of the stream, libpq drops the connection and with it what a
    cancel request needs (the server's address and key). Neither this nor
    the sender it returns ever raises.
    """
    try:
        if conn.pgconn.transaction_status != TransactionStatus.ACTIVE:
            return None
    except Exception:
        return None
    return prepared_cancel(conn)


def _send_cancel(request: PGcancelConn) -> None:
    """Send ``request``, waiting up to :data:`CANCEL_TIMEOUT`; never raises.

    libpq's non-blocking calls, waited on with ``poll()``: psycopg's
    ``blocking()`` keeps the GIL while libpq waits.
    """
    try:
        try:
            deadline = monotonic() + CANCEL_TIMEOUT
            request.start()
            while (status := request.poll()) != PollingStatus.OK:
                if status == PollingStatus.FAILED:
                    raise psycopg.OperationalError(request.get_error_message())
                remaining = deadline - monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no answer within {CANCEL_TIMEOUT:g} s")
                waiting = select.poll()
                waiting.register(
                    request.socket,
                    select.POLLIN if status == PollingStatus.READING else select.POLLOUT,
                )
                waiting.poll(remaining * 1000)
        finally:
            request.finish()
    except Exception as exc:
        _could_not_cancel(exc)


def _send_old_cancel(request: PGcancel) -> None:
    """Send ``request`` with libpq < 17's ``PQcancel`` (no timeout but TCP's); never raises."""
    try:
        request.cancel()
    except Exception as exc:
        _could_not_cancel(exc)


def _could_not_cancel(exc: Exception) -> None:
    logger.debug("could not cancel the query of a connection still in use: %s", exc)


def cancel_in_background(conn: psycopg.AsyncConnection[Any] | psycopg.Connection[Any]) -> bool:
    """Send a cancel request for ``conn``'s query in progress from a short-lived thread.

    False if none was sent: no query runs, or sending one could stop the
    process (see :func:`cancel_stops_nothing`). The caller never waits on the
    network: libpq < 17's ``PQcancel`` has no timeout but TCP's. Never raises.
    """
    request = _cancel_request(conn)
    if request is None:
        return False
    send_in_background(request)
    return True


def prepared_cancel(
    conn: psycopg.AsyncConnection[Any] | psycopg.Connection[Any],
) -> Callable[[], None] | None:
    """A cancel request for whatever query ``conn`` runs later, made now; None where
    sending one could stop the process (see :func:`cancel_stops_nothing`).

    For a caller that may be interrupted mid-query: psycopg, cancelled again
    while it sends its own cancel request, closes the connection without one,
    and the query runs on (see ``AsyncLifecycle.connect``). Send it with
    :func:`send_in_background`. Never raises.
    """
    if not cancel_stops_nothing():
        return None
    try:
        pgconn = conn.pgconn
        if psycopg.capabilities.has_cancel_safe():
            return partial(_send_cancel, pgconn.cancel_conn())
        return partial(_send_old_cancel, pgconn.get_cancel())
    except Exception:
        return None


def send_in_background(request: Callable[[], None]) -> None:
    """Send a cancel request (:func:`prepared_cancel`) from a short-lived thread."""
    threading.Thread(target=request, name="aiopgpool-cancel", daemon=True).start()


def close_async(conn: psycopg.AsyncConnection[Any]) -> None:
    """Close ``conn`` now, or shut it down now (cancelling its query on the server) and
    close it when its call ends.

    Never blocks, never suspends, never raises.
    """
    if not conn.lock.locked():  # nobody can take it between this test and finish()
        _finish(conn)
        return
    request = _shut_down(conn)
    if request is not None:
        send_in_background(request)
    try:
        task = asyncio.get_running_loop().create_task(_finish_when_free(conn))
    except RuntimeError:  # no loop any more: the connection's finalizer closes it
        return
    _pending.add(task)
    task.add_done_callback(_pending.discard)


async def _finish_when_free(conn: psycopg.AsyncConnection[Any]) -> None:
    # asyncio.Lock is fair: a call started after the one in progress waits
    # behind this one, then finds the connection closed without waiting on it.
    async with conn.lock:
        _finish(conn)


def close_blocking(conn: psycopg.Connection[Any]) -> None:
    """Close a sync ``conn`` now, or shut it down now (cancelling its query on the server)
    and close it when its call ends.

    The call in progress runs in another thread: a short-lived thread sends
    the cancel request and waits (up to :data:`LET_GO_TIMEOUT`) for that call
    to let go. Never blocks, never raises.
    """
    lock = conn.lock
    if lock.acquire(blocking=False):
        try:
            _finish(conn)
        finally:
            lock.release()
        return
    request = _shut_down(conn)
    threading.Thread(
        target=_finish_when_released, args=(conn, request), name="aiopgpool-close", daemon=True
    ).start()


def _finish_when_released(
    conn: psycopg.Connection[Any], request: Callable[[], None] | None
) -> None:
    if request is not None:
        request()
    if conn.lock.acquire(timeout=LET_GO_TIMEOUT):
        try:
            _finish(conn)
        finally:
            conn.lock.release()
