"""The command line: ``python -m benchmarks [throughput | reliability | cycles] [options]``.

``throughput`` is the default: ``python -m benchmarks --quick`` is
``python -m benchmarks throughput --quick``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

#: Subcommand -> (module under ``benchmarks``, one-line help). Each module has
#: ``DESCRIPTION``, ``add_arguments(parser)`` and ``run(args, parser, argv)``.
COMMANDS: dict[str, tuple[str, str]] = {
    "throughput": ("throughput", "ops/s against the peers and the floor (the default)"),
    "reliability": ("reliability.command", "server restarts and network cuts, pool by pool"),
    "cycles": ("cycles.command", "instructions per checkout/return, counted with callgrind"),
}
DEFAULT = "throughput"

Run = Callable[[argparse.Namespace, argparse.ArgumentParser, Sequence[str]], int]


def _module(name: str) -> ModuleType:
    import importlib

    return importlib.import_module(f"benchmarks.{COMMANDS[name][0]}")


def build_parser() -> argparse.ArgumentParser:
    """The parser: one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(
            "aiopgpool's benchmarks. With no command, runs 'throughput'."
            " See 'python -m benchmarks COMMAND --help'."
        ),
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        module = _module(name)
        sub = commands.add_parser(
            name,
            help=summary,
            description=module.DESCRIPTION,
            prog=f"python -m benchmarks {name}",
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.run, parser=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the chosen command."""
    given = list(sys.argv[1:] if argv is None else argv)
    if given[:1] == ["replicas"]:  # a standalone command: it starts its own cluster
        from benchmarks.replicas import main as replicas_main

        return replicas_main(given[1:])
    explicit = bool(given) and (given[0] in COMMANDS or given[0] in ("-h", "--help"))
    full = given if explicit else [DEFAULT, *given]
    args = build_parser().parse_args(full)
    run: Run = args.run
    # The throughput command records its command line as typed (without an implied name).
    return run(args, args.parser, given)
