"""``python -m benchmarks.reliability``: the same as ``python -m benchmarks reliability``."""

from __future__ import annotations

import sys

from benchmarks.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["reliability", *sys.argv[1:]]))
