"""The ``pvtv2`` command: a thin layer over the library. Each subcommand parses its flags and calls one function.

Every subcommand is registered by an ``_add_<name>(subparsers)`` function next to its ``_cmd_<name>(args)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]

logger = logging.getLogger("pvtv2")


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="pvtv2",
        description="PVTv2 image models: predict, evaluate, train, export, inspect.",
    )
    parser.add_argument("--version", action="version", version=f"pvtv2 {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _REGISTRY:
        add(subparsers)
    return parser


_REGISTRY: list = []


def _register(fn):
    _REGISTRY.append(fn)
    return fn


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, OSError) as err:
        # Errors meant for people: print them without a traceback (use -v for one).
        if args.verbose:
            raise
        print(f"pvtv2 {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pvtv2 {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
