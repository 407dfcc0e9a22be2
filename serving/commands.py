"""`llmos serve deploy|status|delete|config`."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from cluster.console import UserError, at_least, port_number, print_json, print_table, progress, stdout
from serving.spec import load_serve_job


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="Serve trained checkpoints with Ray Serve, placed by the controller.")
    commands = serve.add_subparsers(dest="serve_command", metavar="COMMAND", required=True)

    deploy = commands.add_parser("deploy", help="Book replicas through the controller and start the application.")
    deploy.add_argument("job", help="ServeJob YAML (e.g. examples/serve.yaml).")
    deploy.add_argument("--host", default="127.0.0.1", help="HTTP host of the Serve proxy.")
    deploy.add_argument("--port", type=port_number, default=8000, help="HTTP port of the Serve proxy.")
    deploy.add_argument(
        "--wait",
        type=at_least(0, float),
        default=60.0,
        help="Seconds to wait for the minimum replicas to be placed, and again for Serve to run them.",
    )
    deploy.add_argument("--json", action="store_true")
    deploy.set_defaults(func=_deploy)

    status = commands.add_parser("status", help="Applications, their replicas and the controller's bookings.")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_status)

    delete = commands.add_parser("delete", help="Remove an application and release its replicas.")
    delete.add_argument("name")
    delete.add_argument("--json", action="store_true")
    delete.set_defaults(func=_delete)

    config = commands.add_parser("config", help="Ray's own Serve config (for `serve deploy` and RayService).")
    config.add_argument("job", help="ServeJob YAML.")
    config.add_argument("-o", "--output", type=Path, help="Write the YAML here instead of printing it.")
    config.add_argument("--host", default="0.0.0.0", help="HTTP host of Serve's proxies (127.0.0.1 keeps it local).")
    config.add_argument("--port", type=port_number, default=8000)
    config.set_defaults(func=_config)


def _deploy(args: argparse.Namespace) -> int:
    from cluster.admin import Admin
    from serving.deploy import deploy

    job = load_serve_job(args.job)
    deployment = deploy(job, Admin(), host=args.host, port=args.port, wait_s=args.wait, on_progress=progress)
    if args.json:
        print_json(deployment)
    else:
        stdout.print(f"{deployment.name}: {deployment.replicas} replica(s) on {', '.join(deployment.nodes)}")
        stdout.print(f"POST {deployment.url}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from ray import serve

    from cluster.admin import Admin

    admin = Admin()
    applications = serve.status().applications
    bookings = [s for s in admin.queue() if s.request.kind.value == "serving"]
    if args.json:
        print_json(
            {
                "applications": {name: app.status.value for name, app in applications.items()},
                "replicas": [
                    {"id": s.id, "deployment": s.request.group, "state": s.state.value, "nodes": s.nodes}
                    for s in bookings
                ],
            }
        )
        return 0
    print_table(
        "Applications", ["name", "status", "message"], [[n, a.status.value, a.message] for n, a in applications.items()]
    )
    print_table(
        "Replica bookings",
        ["request", "deployment", "state", "node", "reason"],
        [[s.id, s.request.group, s.state.value, ",".join(s.nodes), s.reason] for s in bookings],
    )
    return 0


def _delete(args: argparse.Namespace) -> int:
    from cluster.admin import Admin
    from serving.deploy import delete

    released = delete(args.name, Admin())
    if args.json:
        print_json({"deleted": args.name, "released": released})
    else:
        stdout.print(f"deleted {args.name}; released {', '.join(released) or 'no bookings'}")
    return 0


def _config(args: argparse.Namespace) -> int:
    from serving.config import build_serve_config

    text = yaml.safe_dump(build_serve_config(load_serve_job(args.job), host=args.host, port=args.port), sort_keys=False)
    if args.output:
        try:
            args.output.write_text(text)
        except OSError as error:
            raise UserError(f"-o {args.output}: cannot write it: {error.strerror}") from None
        stdout.print(f"wrote {args.output}; deploy it with `serve deploy {args.output}`")
    else:
        print(text, end="")
    return 0
