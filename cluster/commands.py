"""`llmos spec ...`, `llmos up`, `llmos down`, `llmos status`."""

from __future__ import annotations

import argparse

from cluster.console import print_json, stdout
from cluster.spec import SpecError, load_spec


def register(subparsers: argparse._SubParsersAction) -> None:
    spec = subparsers.add_parser("spec", help="Work with ClusterSpec files.")
    spec_commands = spec.add_subparsers(dest="spec_command", metavar="COMMAND", required=True)
    validate = spec_commands.add_parser("validate", help="Check a ClusterSpec; print its problems or 'ok'.")
    validate.add_argument("spec", help="Path to a ClusterSpec YAML file.")
    validate.add_argument("--json", action="store_true", help="Print {ok, problems} as JSON.")
    validate.set_defaults(func=_spec_validate)


def _spec_validate(args: argparse.Namespace) -> int:
    try:
        load_spec(args.spec)
    except SpecError as error:
        if args.json:
            print_json({"ok": False, "problems": error.problems})
        else:
            stdout.print(str(error))
        return 1
    if args.json:
        print_json({"ok": True, "problems": []})
    else:
        stdout.print("ok")
    return 0
