"""The compiled hot paths (setup.py, aiopgpool.native): which form loads, and the build's
fallback to pure Python.

``AIOPGPOOL_TEST_EXPECT_COMPILED`` (CI sets it: 1, or 0 for the pure-Python run) makes
the suite fail unless it runs the form it was meant to test.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fakes import IN_TRANSACTION, FakeLifecycle, make_core, opened

import aiopgpool
from aiopgpool import native

PACKAGE = Path(aiopgpool.__file__).parent
ROOT = PACKAGE.parent
PROBE = (
    "import aiopgpool.native as n, aiopgpool.core as c; "
    "print(n.COMPILED, c.__file__.endswith('.py'), n.REASON)"
)


def probe(path: Path, **env: str) -> tuple[bool, bool, str, str]:
    """Import aiopgpool from ``path`` in a fresh interpreter: (COMPILED, core is .py,
    REASON, stderr)."""
    environ = {k: v for k, v in os.environ.items() if k != "AIOPGPOOL_PURE_PYTHON"}
    environ.update(env, PYTHONPATH=str(path))
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=environ, capture_output=True, text=True, cwd=path
    )
    assert done.returncode == 0, done.stderr
    compiled, source, reason = done.stdout.strip().split(" ", 2)
    return compiled == "True", source == "True", reason, done.stderr


def test_the_form_ci_expects_is_the_one_running() -> None:
    expect = os.environ.get("AIOPGPOOL_TEST_EXPECT_COMPILED")
    if not expect:
        pytest.skip("AIOPGPOOL_TEST_EXPECT_COMPILED is not set (CI sets it)")
    assert native.COMPILED is (expect == "1"), native.REASON


def test_the_flag_tells_the_truth() -> None:
    import aiopgpool.core as core

    assert native.COMPILED is not core.__file__.endswith(".py"), native.REASON
    for name in native.MODULES:
        module = sys.modules[f"aiopgpool.{name}"]
        assert module.__file__ is not None
        assert module.__file__.endswith(".py") is not native.COMPILED, name


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    """A copy of the package as installed (compiled modules and the shared library too)."""
    if not native.COMPILED:
        pytest.skip(f"the hot paths are not compiled here: {native.REASON}")
    shutil.copytree(PACKAGE, tmp_path / "aiopgpool", ignore=shutil.ignore_patterns("__pycache__"))
    for lib in PACKAGE.parent.glob("aiopgpool__mypyc*"):
        shutil.copy2(lib, tmp_path / lib.name)
    return tmp_path


def test_a_copy_loads_compiled(package_copy: Path) -> None:
    compiled, source, reason, _ = probe(package_copy)
    assert (compiled, source) == (True, False), reason


def test_pure_python_on_request(package_copy: Path) -> None:
    compiled, source, reason, _ = probe(package_copy, AIOPGPOOL_PURE_PYTHON="1")
    assert (compiled, source) == (False, True)
    assert "AIOPGPOOL_PURE_PYTHON" in reason


def test_an_edited_source_loads_every_module_from_source_with_a_warning(
    package_copy: Path,
) -> None:
    slot = package_copy / "aiopgpool" / "slot.py"
    slot.write_text(slot.read_text() + "\n# edited\n")
    compiled, source, reason, stderr = probe(package_copy)
    assert (compiled, source) == (False, True)  # core too: all or none
    assert "slot.py changed since it was compiled" in reason
    assert "slot.py changed since it was compiled" in stderr


def test_no_build_for_this_python_loads_the_sources(package_copy: Path) -> None:
    for so in (package_copy / "aiopgpool").glob("core.*.so"):
        so.unlink()
    compiled, source, reason, stderr = probe(package_copy)
    assert (compiled, source) == (False, True)
    assert "not compiled for this Python" in reason
    assert stderr == ""


@pytest.mark.parametrize(
    "cc, why",
    [
        ("/nonexistent/cc", "no C compiler"),  # found no compiler: not even tried
        ("false", "compiling failed"),  # a compiler that fails: the optional build's fallback
    ],
)
def test_the_build_falls_back_to_pure_python(tmp_path: Path, cc: str, why: str) -> None:
    """What a machine without a working C compiler gets: a pure-Python wheel."""
    if not (ROOT / "setup.py").is_file():
        pytest.skip("not a source checkout")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "CC": cc}
    env.pop("AIOPGPOOL_PURE_PYTHON", None)
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "*.so"),
    )
    (src / "aiopgpool" / "_compiled.json").unlink(missing_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), "-v", str(src)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert why in done.stdout + done.stderr
    (wheel,) = tmp_path.glob("aiopgpool-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "aiopgpool/core.py" in names and "aiopgpool/native.py" in names
    assert not [n for n in names if n.endswith((".so", ".pyd")) or "_compiled" in n]


# -- awaits compiled on Python 3.12+ -------------------------------------------------------
# mypyc (2.4) passes an exception thrown into a compiled coroutine on to what it awaits
# with throw(type, value, traceback), deprecated since 3.12: a DeprecationWarning at
# every cancelled wait, raised instead of the cancellation under -W error. setup.py
# builds with that call in the one-argument form. This runs in whichever form loads;
# CI runs it compiled on 3.12 and 3.13.


@contextmanager
def throw_deprecation_is_an_error() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "error", message=re.escape("the (type, exc, tb) signature of throw()")
        )
        yield


async def test_cancelled_and_timed_out_waits_raise_their_own_errors() -> None:
    fake = FakeLifecycle()
    async with opened(make_core(fake, max_size=1)) as core:
        held = await core.getconn()
        with throw_deprecation_is_an_error():
            # In line (the hand-off queue's future).
            with pytest.raises(asyncio.TimeoutError):  # not yet TimeoutError on 3.10
                await asyncio.wait_for(core.getconn(), 0.05)
            waiting = asyncio.create_task(core.getconn())
            await asyncio.sleep(0.01)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            # While the connection is cleaned on return (validation.restore).
            fake.clean_gate = asyncio.Event()
            held.state = IN_TRANSACTION
            returning = asyncio.create_task(core.putconn(held))
            await asyncio.sleep(0.01)
            returning.cancel()
            with pytest.raises(asyncio.CancelledError):
                await returning
            # While a borrower connects (validation.prepare).
            fake.gate = asyncio.Event()
            connecting = asyncio.create_task(core.getconn())
            await asyncio.sleep(0.01)
            assert fake.connecting == 1
            connecting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await connecting
        fake.gate.set()
        fake.clean_gate.set()
        assert core.stats().waiting == 0
