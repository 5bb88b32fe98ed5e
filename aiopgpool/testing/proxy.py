"""A small loopback TCP proxy for fault-injection tests.

:class:`TcpProxy` sits between a client (a pool, psycopg, ...) and a
PostgreSQL server and can, at any moment, stop passing bytes (a network
partition), abort every connection with a TCP RST, or go back to forwarding.
It runs its own asyncio event loop in a daemon thread, so it can be driven
from plain synchronous tests as well as from async tests running on another
event loop. Every control call returns once the new mode is in force.

Only loopback addresses (``127.0.0.0/8``, ``::1``, or the name ``localhost``)
are accepted, both to listen on and as the target: this is a test tool and
must never be pointed at a real network.

Example::

    with local_cluster() as cluster, TcpProxy(cluster.host, cluster.port) as proxy:
        conn = psycopg.connect(proxy.dsn(cluster.dsn))
        proxy.blackhole()   # conn's next query hangs until its own timeout
        proxy.reset()       # conn fails at once: connection reset by peer
        proxy.forward()     # new connections work again
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Literal

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from aiopgpool.testing.process import check_loopback

__all__ = ["Mode", "TcpProxy"]

Mode = Literal["forward", "blackhole", "reset"]
_MODES: tuple[Mode, ...] = ("forward", "blackhole", "reset")
_CHUNK = 64 * 1024
_CONNECT_TIMEOUT = 5.0
_CONTROL_TIMEOUT = 10.0


def _abort_with_rst(writer: asyncio.StreamWriter | None) -> None:
    """Close a connection at once with a TCP RST (SO_LINGER on, timeout 0)."""
    if writer is None:
        return
    transport = writer.transport
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class _Link:
    """One proxied client connection and, once made, its upstream connection."""

    __slots__ = ("broken", "client_r", "client_w", "closed", "up_r", "up_w")

    def __init__(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.client_r = client_r
        self.client_w = client_w
        self.up_r: asyncio.StreamReader | None = None
        self.up_w: asyncio.StreamWriter | None = None
        # One side went away while bytes were not flowing: in a real partition
        # the other side would not learn of it until the network heals.
        self.broken = False
        self.closed = False


class TcpProxy:
    """A loopback TCP proxy whose traffic can be cut, reset or resumed at will.

    Modes:

    ``"forward"``
        Pipe bytes both ways (the default).
    ``"blackhole"``
        Keep every socket open, existing and new ones alike, but drop every
        byte in both directions: peers hang until their own timeouts, as in a
        network partition. A side closing its end is not passed on either,
        until forwarding resumes. Connections accepted in this mode reach the
        target only if forwarding resumes and the client sends more bytes.
    ``"reset"``
        Abort every existing connection (both ends) with a TCP RST, and
        reset new connections as soon as they are accepted.

    Switching modes takes effect at once for existing connections. Going back
    to ``"forward"`` after a blackhole lets bytes flow again on the surviving
    connections, but what was dropped stays dropped: a client waiting for a
    reply to a dropped request keeps waiting (that is the fault).

    Args:
        target_host: where to forward to; a loopback address.
        target_port: the target's TCP port.
        listen_host: where to listen; a loopback address. The port is chosen
            by the operating system when :meth:`start` runs.

    Raises:
        ValueError: an address is not loopback, or the port is out of range.
    """

    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1") -> None:
        self.target_host = check_loopback(target_host, "TcpProxy target")
        if isinstance(target_port, bool) or not isinstance(target_port, int):
            raise ValueError(f"TcpProxy target port must be an int, got {target_port!r}")
        if not 0 < target_port < 65536:
            raise ValueError(f"TcpProxy target port {target_port} is out of range")
        self.target_port = target_port
        self.host = check_loopback(listen_host, "TcpProxy listen")
        self._port: int | None = None
        self._mode: Mode = "forward"
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._lock = threading.Lock()
        self._closed = False

    # -- public API ---------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the proxy listens on (known once :meth:`start` has run)."""
        if self._port is None:
            raise RuntimeError("TcpProxy is not started: call start() or use it as a context")
        return self._port

    @property
    def mode(self) -> Mode:
        """The current mode: ``"forward"``, ``"blackhole"`` or ``"reset"``.

        Assigning to it is the same as calling the method of that name.
        """
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self.set_mode(value)

    @property
    def connections(self) -> int:
        """How many client connections are open through the proxy right now."""
        return len(self._links)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._closed

    def start(self) -> None:
        """Start the proxy's event loop thread and listen on a free port.

        Returns once the proxy accepts connections.

        Raises:
            RuntimeError: already started, or closed.
            OSError: the listening socket could not be made.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("TcpProxy is closed")
            if self._thread is not None:
                raise RuntimeError("TcpProxy is already started")
            loop = asyncio.new_event_loop()
            ready = threading.Event()
            thread = threading.Thread(
                target=self._run_loop,
                args=(loop, ready),
                name=f"TcpProxy->{self.target_host}:{self.target_port}",
                daemon=True,
            )
            self._loop = loop
            self._thread = thread
            thread.start()
            ready.wait()
            try:
                fut = asyncio.run_coroutine_threadsafe(self._listen(), loop)
                fut.result(_CONTROL_TIMEOUT)
            except BaseException:
                self._stop_thread()
                self._closed = True
                raise

    def close(self) -> None:
        """Stop listening, abort every connection and join the thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._thread is None:
                return
            self._check_not_own_thread()
            loop = self._loop
            assert loop is not None
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(_CONTROL_TIMEOUT)
            self._stop_thread()

    def forward(self) -> None:
        """Pipe bytes both ways again, on existing and new connections."""
        self.set_mode("forward")

    def blackhole(self) -> None:
        """Keep sockets open but drop every byte both ways, on existing and new connections."""
        self.set_mode("blackhole")

    def reset(self) -> None:
        """Abort every existing connection with a TCP RST, and reset new ones at once."""
        self.set_mode("reset")

    def set_mode(self, mode: str) -> None:
        """Switch to ``mode``; returns once it is in force for every existing connection.

        Raises:
            ValueError: unknown mode.
            RuntimeError: the proxy is not started, or closed.
        """
        if mode not in _MODES:
            raise ValueError(f"unknown TcpProxy mode {mode!r}; expected one of {_MODES}")
        new_mode: Mode = mode
        with self._lock:
            if self._closed:
                raise RuntimeError("TcpProxy is closed")
            loop = self._loop
            if loop is None:
                # Not started yet: just remember the mode for when it is.
                self._mode = new_mode
                return
            self._check_not_own_thread()
            fut = asyncio.run_coroutine_threadsafe(self._apply_mode(new_mode), loop)
            fut.result(_CONTROL_TIMEOUT)

    def dsn(self, base_dsn: str) -> str:
        """Return ``base_dsn`` (a libpq conninfo string or URL) pointed at the proxy.

        ``host`` and ``port`` are replaced by the proxy's; a ``hostaddr``,
        which libpq would use instead of ``host``, is dropped.
        """
        params = conninfo_to_dict(base_dsn)
        params.pop("hostaddr", None)
        params["host"] = self.host
        params["port"] = str(self.port)
        return make_conninfo("", **params)

    def __enter__(self) -> TcpProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f"{self.host}:{self._port}" if self._port is not None else "not started"
        state = "closed" if self._closed else self._mode
        return (
            f"<TcpProxy {where} -> {self.target_host}:{self.target_port} {state}, "
            f"{self.connections} connections>"
        )

    # -- thread plumbing ----------------------------------------------------

    def _check_not_own_thread(self) -> None:
        if threading.current_thread() is self._thread:
            raise RuntimeError("TcpProxy control methods cannot be called from its own loop")

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    def _stop_thread(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(_CONTROL_TIMEOUT)

    # -- everything below runs on the proxy's own loop ------------------------

    async def _listen(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._server = await asyncio.start_server(
            self._on_client, host=self.host, port=0, family=family, reuse_address=True
        )
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            self._close_link(link, rst=False, abort=True)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        # Let the transports' connection_lost callbacks run.
        await asyncio.sleep(0)

    async def _apply_mode(self, mode: Mode) -> None:
        self._mode = mode
        if mode == "reset":
            for link in list(self._links):
                self._close_link(link, rst=True)
        elif mode == "forward":
            # Closes that happened during a blackhole reach the other side now.
            for link in list(self._links):
                if link.broken:
                    self._close_link(link, rst=False)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _close_link(self, link: _Link, *, rst: bool, abort: bool = False) -> None:
        if link.closed:
            return
        link.closed = True
        self._links.discard(link)
        for writer in (link.client_w, link.up_w):
            if writer is None:
                continue
            if rst:
                _abort_with_rst(writer)
            elif abort:
                writer.transport.abort()
            else:
                writer.close()

    def _side_gone(self, link: _Link) -> None:
        """One end of ``link`` closed or failed."""
        if self._mode == "blackhole":
            link.broken = True
        else:
            self._close_link(link, rst=False)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closed or self._mode == "reset":
            _abort_with_rst(writer)
            return
        link = _Link(reader, writer)
        self._links.add(link)
        try:
            if self._mode == "forward" and not await self._connect_upstream(link):
                return
            await self._pump(link, to_upstream=True)
        except asyncio.CancelledError:
            self._close_link(link, rst=False, abort=True)
            raise
        except Exception:
            self._close_link(link, rst=False, abort=True)

    async def _connect_upstream(self, link: _Link) -> bool:
        """Connect ``link`` to the target; on failure close the client side and return False."""
        try:
            up_r, up_w = await asyncio.wait_for(
                asyncio.open_connection(self.target_host, self.target_port), _CONNECT_TIMEOUT
            )
        except (OSError, asyncio.TimeoutError):
            # The target refused (or is not there): the nearest thing to that is an RST.
            self._close_link(link, rst=True)
            return False
        if link.closed:  # reset or shut down while connecting
            _abort_with_rst(up_w)
            return False
        link.up_r, link.up_w = up_r, up_w
        self._spawn(self._pump(link, to_upstream=False))
        return True

    async def _pump(self, link: _Link, *, to_upstream: bool) -> None:
        """Copy bytes one way, client to upstream or back, while ``link`` lives.

        The client-to-upstream pump makes the upstream connection when the first bytes
        arrive after a blackhole accepted the client; it then starts the other pump.
        """
        reader = link.client_r if to_upstream else link.up_r
        assert reader is not None
        while not link.closed:
            try:
                data = await reader.read(_CHUNK)
            except (OSError, asyncio.IncompleteReadError):
                data = b""
            if link.closed:
                return
            if not data:
                self._side_gone(link)
                return
            if self._mode != "forward":
                continue  # dropped
            if link.broken:
                self._close_link(link, rst=False)
                return
            if to_upstream and link.up_w is None and not await self._connect_upstream(link):
                return
            writer = link.up_w if to_upstream else link.client_w
            assert writer is not None
            try:
                writer.write(data)
                await writer.drain()
            except OSError:
                self._side_gone(link)
                return
