"""One subject's measured loops, run by :mod:`benchmarks.cycles.command` under callgrind.

``python -m benchmarks.cycles.child SUBJECT DSN PLAIN_N1,PLAIN_N2 WAITED_N1,WAITED_N2
[SOCKET_TEST_INTERVAL]``

Opens the subject's pool of :data:`POOL_SIZE` real connections (all I/O happens
here), warms every path up, then runs four segments: the plain cycle ``N1`` and
``N2`` times, the waited op ``N1`` and ``N2`` times. Each segment runs inside one
call of ``functools.reduce`` (a C function nothing else here calls), so that
callgrind's ``--zero-before``/``--dump-after`` on it give one dump per segment with
that segment's instructions alone (see :func:`in_segment`). Prints the segments as
JSON on its last line.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import importlib
import json
import pkgutil
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

from benchmarks.adapters_async import AsyncAdapter
from benchmarks.adapters_sync import SyncAdapter
from benchmarks.plan import PoolSpec, all_pools

#: aiopgpool's subjects run twice: as installed, and with AIOPGPOOL_PURE_PYTHON set by the
#: parent (its pure-Python modules; see aiopgpool.native): both forms in one run.
PURE = "-pure"
#: The subjects: the throughput command's async and sync pools (psycopg2's is left out:
#: it is not in the comparison this command was made for; so are reference rows such as
#: the FIFO floor, whose order matters only to queries, which these cycles do not run).
SUBJECTS: dict[str, PoolSpec] = {}
for _pool in all_pools():
    if (
        _pool.family in ("async", "sync")
        and _pool.name not in ("psycopg2", "aiopgpool-discard")
        and not _pool.is_reference
    ):
        SUBJECTS[_pool.key] = _pool
        if _pool.name == "aiopgpool":
            SUBJECTS[_pool.key + PURE] = _pool
#: Connections in every subject's pool (the waited op: TASKS tasks on them).
POOL_SIZE = 2
TASKS = 20
WARMUP = 300
#: Seconds to sleep after the warm-up (slowed down ~50x under callgrind, threads finish late).
SETTLE = 2.0
#: The C function that wraps each measured segment (the parent's callgrind options name it).
SEGMENT_FUNCTION = "functools_reduce"


def in_segment(body: Callable[[], None]) -> None:
    """Run ``body`` inside one call of ``functools.reduce`` (see the module docstring).

    An empty segment comes first: callgrind's ``--zero-before`` zeroes only the
    calling thread's counts, while a dump empties every thread's. The empty
    segment's dump takes what the other threads did since the last dump, so the
    real one counts what every thread did while it ran. Parts come in pairs: the
    second of each is the segment's.
    """
    functools.reduce(_call, [_nothing], None)
    functools.reduce(_call, [body], None)


def _call(_: None, body: Callable[[], object]) -> None:
    body()


def _nothing() -> None:
    pass


def set_socket_test_interval(seconds: float) -> list[str]:
    """Set aiopgpool's ``SOCKET_TEST_INTERVAL`` wherever a module defines it; return where."""
    import aiopgpool

    patched = []
    for info in pkgutil.walk_packages(aiopgpool.__path__, "aiopgpool."):
        if ".testing" in info.name or info.name.endswith(
            ("psycopg2", "opentelemetry", "prometheus")
        ):
            continue
        module = sys.modules.get(info.name)
        if module is None:
            try:
                module = importlib.import_module(info.name)
            except Exception:
                continue
        if hasattr(module, "SOCKET_TEST_INTERVAL"):
            setattr(module, "SOCKET_TEST_INTERVAL", seconds)  # noqa: B010 (not a name mypy knows)
            patched.append(info.name)
    return patched


# -- async ------------------------------------------------------------------------------


async def _plain_async(get: Any, put: Any, n: int) -> None:
    for _ in range(n):
        conn = await get()
        await put(conn)


async def _waited_async(get: Any, put: Any, n: int) -> None:
    todo = iter(range(n))

    async def worker() -> None:
        for _ in todo:
            conn = await get()
            await asyncio.sleep(0)  # hold it across one turn of the loop: the others queue
            await put(conn)

    await asyncio.gather(*(worker() for _ in range(TASKS)))


def _drive(
    loop: asyncio.AbstractEventLoop,
    loop_fn: Callable[[Any, Any, int], Coroutine[Any, Any, None]],
    get: Any,
    put: Any,
    n: int,
) -> None:
    loop.run_until_complete(loop_fn(get, put, n))


def run_async(subject: PoolSpec, dsn: str, plain: list[int], waited: list[int]) -> None:
    """Open the async subject, warm up, run the four segments, close."""
    loop = asyncio.new_event_loop()
    adapter = subject.adapter()
    assert isinstance(adapter, AsyncAdapter)
    loop.run_until_complete(adapter.open(dsn, POOL_SIZE, POOL_SIZE))
    get, put = adapter.raw_calls()
    try:
        loop.run_until_complete(_plain_async(get, put, WARMUP))
        loop.run_until_complete(_waited_async(get, put, WARMUP))
        _settle()
        for n in plain:
            in_segment(partial(_drive, loop, _plain_async, get, put, n))
        for n in waited:
            in_segment(partial(_drive, loop, _waited_async, get, put, n))
    finally:
        loop.run_until_complete(adapter.close())
        loop.close()


# -- sync -------------------------------------------------------------------------------


def _plain_sync(get: Any, put: Any, n: int) -> None:
    for _ in range(n):
        put(get())


def _waited_sync(get: Any, put: Any, n: int) -> None:
    todo = iter(range(n))  # shared: next() on it is atomic under the GIL

    def worker() -> None:
        for _ in todo:
            conn = get()
            time.sleep(0)  # let another thread run while holding it
            put(conn)

    threads = [threading.Thread(target=worker) for _ in range(TASKS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def run_sync(subject: PoolSpec, dsn: str, plain: list[int], waited: list[int]) -> None:
    """Open the sync subject, warm up, run the four segments, close."""
    adapter = subject.adapter()
    assert isinstance(adapter, SyncAdapter)
    adapter.open(dsn, POOL_SIZE, POOL_SIZE)
    get, put = adapter.raw_calls()
    try:
        _plain_sync(get, put, WARMUP)
        _waited_sync(get, put, WARMUP)
        _settle()
        for n in plain:
            in_segment(partial(_plain_sync, get, put, n))
        for n in waited:
            in_segment(partial(_waited_sync, get, put, n))
    finally:
        adapter.close()


def _settle() -> None:
    """Let background threads go idle; collect and freeze what exists (same heap state)."""
    time.sleep(SETTLE)
    gc.collect()
    gc.freeze()


def main(argv: list[str]) -> int:
    """Run one subject (see the module docstring)."""
    name, dsn, plain_arg, waited_arg, *rest = argv
    subject = SUBJECTS[name]
    plain = [int(x) for x in plain_arg.split(",")]
    waited = [int(x) for x in waited_arg.split(",")]
    patched: list[str] = []
    if rest and subject.name == "aiopgpool":
        patched = set_socket_test_interval(float(rest[0]))
    runner = run_async if subject.family == "async" else run_sync
    runner(subject, dsn, plain, waited)
    segments = [{"kind": "plain", "n": n} for n in plain]
    segments += [{"kind": "waited", "n": n} for n in waited]
    print(json.dumps({"subject": name, "segments": segments, "patched": patched}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
