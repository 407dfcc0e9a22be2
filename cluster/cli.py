"""The `llmos` command line: a thin layer over the Python APIs.

Each command group lives next to the code it drives and exposes `register(subparsers)`, which adds
its commands with `set_defaults(func=handler)`; a handler takes the parsed args and returns an exit
code. Errors the user can fix are raised as `UserError` (or `SpecError`) and printed without a
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cluster.commands import other_kind_hint
from cluster.console import UserError, print_error, print_hint
from cluster.spec import SpecError

# Modules exposing `register(subparsers)`, imported lazily so `llmos --help` stays fast.
COMMAND_GROUPS = (
    "cluster.commands",
    "cluster.admin_commands",
    "manifests.commands",
    "serving.commands",
    "benchmarks.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmos",
        description="llmos: pools, gang placement, quotas, training and serving on one Ray cluster.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_GROUPS:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as error:
        print_error(error)
        return 2
    except SpecError as error:
        print_error(error)
        print_hint(other_kind_hint(error))
        return 2
    except KeyboardInterrupt:
        print_error(UserError("interrupted"))
        return 130


if __name__ == "__main__":
    sys.exit(main())
