"""The main job, ``python -m benchmarks``, runs end to end (a smoke run, not a measurement).

The README's first command is the benchmark comparison against the peers: these
tests keep it working. Figures are never asserted (performance is measured by the
benchmarks themselves, on a quiet machine); only that every pool runs every case and
that the results are written, without the password of ``--dsn`` anywhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

from benchmarks.environment import command_line, redact_dsn

ROOT = Path(__file__).resolve().parent.parent


def run_benchmarks(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_quick_run_measures_every_pool_in_every_case(dsn: str, tmp_path: Path) -> None:
    proc = run_benchmarks(
        "--quick",
        "--rounds=1",
        "--duration=0.02",
        "--warmup=0",
        "--no-progress",
        f"--dsn={dsn}",
        f"--out={tmp_path}",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "All pools ran every selected case." in proc.stdout, proc.stdout[-3000:]
    doc = json.loads((tmp_path / "latest.json").read_text())
    assert doc["server"]["source"] == "--dsn"
    pools = set(doc["pools"])
    assert {"async/aiopgpool", "sync/aiopgpool", "async/psycopg_pool", "async/asyncpg"} <= pools
    measured = {(r["case"], r["pool"]) for r in doc["results"] if r["problem"] is None}
    assert measured == {(r["case"], r["pool"]) for r in doc["results"]}
    assert all(r["rounds"] and r["rounds"][0]["ops"] > 0 for r in doc["results"])
    assert {t["status"] for t in doc["targets"]} <= {"PASS", "FAIL", "SKIP"}
    assert (tmp_path / "latest.png").stat().st_size > 0
    password = conninfo_to_dict(dsn).get("password")
    if password:  # a server that asks for one: it is shown nowhere
        for text in (proc.stdout, proc.stderr, (tmp_path / "latest.json").read_text()):
            assert str(password) not in text


def test_an_unknown_selection_is_refused_by_name(tmp_path: Path) -> None:
    proc = run_benchmarks("--only=no-such-pool", f"--out={tmp_path}", timeout=60)
    assert proc.returncode == 2
    assert "no-such-pool" in proc.stderr
    assert not (tmp_path / "latest.json").exists()


@pytest.mark.parametrize(
    "dsn",
    [
        "host=db user=app password=s3cret-pw dbname=app",
        "postgresql://app:s3cret-pw@db:5432/app",
    ],
)
def test_the_recorded_command_line_hides_the_password(dsn: str) -> None:
    assert "s3cret-pw" not in redact_dsn(dsn)
    shown = command_line(["--dsn", dsn, "--quick"]) + command_line([f"--dsn={dsn}"])
    assert "s3cret-pw" not in shown
    assert "***" in shown
