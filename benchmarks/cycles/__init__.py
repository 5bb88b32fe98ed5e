"""``python -m benchmarks cycles``: see :mod:`benchmarks.cycles.command`."""
