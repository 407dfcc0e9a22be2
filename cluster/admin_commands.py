"""CLI over the admin API: controller, submit, queue, request, cancel, preempt, nodes, pools list,
utilization, cordon, uncordon, drain, quota, decisions. Tables for people, `--json` for scripts."""

from __future__ import annotations

import argparse
import time

from cluster.console import UserError, at_least, print_json, print_table, stderr, stdout
from cluster.placement.policies import POLICIES
from cluster.requests import RequestState, RequestStatus, SubmitRequest
from cluster.spec import format_memory, load_yaml, parse_memory, parse_model


def _credential(args: argparse.Namespace) -> str | None:
    from cluster.admin import read_credential_file

    if getattr(args, "credential_file", None) is None:
        return None
    return read_credential_file(args.credential_file, "--credential-file")


def _admin(args: argparse.Namespace, start: bool = True):
    from cluster.admin import Admin

    return Admin(getattr(args, "address", None), start=start, credential=_credential(args))


def _with_json(parser: argparse.ArgumentParser, *, under_group: bool = False) -> argparse.ArgumentParser:
    """The options every admin command takes. `under_group`: a subcommand of a group that takes them too
    (`llmos controller --address A stop`); its own copies then leave the group's values alone unless given."""
    inherited = {"default": argparse.SUPPRESS} if under_group else {}
    parser.add_argument("--json", action="store_true", help="Machine-readable output.", **inherited)
    parser.add_argument("--address", help="GCS address of the cluster (default: the local one).", **inherited)
    parser.add_argument(
        "--credential-file",
        help="File holding your team's (or the admin's) credential; default: $LLMOS_CREDENTIAL, "
        "$LLMOS_CREDENTIAL_FILE, or the admin credential of a cluster on this machine.",
        **inherited,
    )
    return parser


def register(subparsers: argparse._SubParsersAction) -> None:
    ctl = _with_json(
        subparsers.add_parser("controller", help="Start, stop or inspect the llmos controller actor (alone: status).")
    )
    ctl.set_defaults(func=_controller_status)
    ctl_commands = ctl.add_subparsers(dest="controller_command", metavar="COMMAND", required=False)
    start = _with_json(
        ctl_commands.add_parser("start", help="Start the controller (refused if one runs)."), under_group=True
    )
    start.add_argument("--spec", help="ClusterSpec (default: the local cluster's).")
    start.add_argument("--policy", default=None, choices=list(POLICIES), help="Placement policy (default llmos).")
    start.add_argument("--state-dir", help="Where the controller journals its state (on the head node).")
    start.add_argument(
        "--remove-unknown-groups",
        action="store_true",
        help="If the state dir has no journal while Ray holds llmos placement groups (the books were lost), "
        "remove those groups and what runs in them, and start with empty books (refused otherwise).",
    )
    start.add_argument(
        "--scale-up",
        action="store_true",
        help="Ray's autoscaler grows the pools up to their max (KubeRay): a gang that fits only on nodes yet to "
        "come waits for them, and the controller asks the autoscaler for them.",
    )
    start.set_defaults(func=_controller_start)
    _with_json(
        ctl_commands.add_parser("stop", help="Stop the controller; placements stay."), under_group=True
    ).set_defaults(func=_controller_stop)
    _with_json(
        ctl_commands.add_parser("status", help="Is it running, with what policy and state."), under_group=True
    ).set_defaults(func=_controller_status)

    submit = _with_json(
        subparsers.add_parser(
            "submit",
            help="Submit gang requests (YAML: team, gang, kind, ...); several files go in one call, all or none.",
        )
    )
    submit.add_argument("request", nargs="+", help="Request YAML file(s); each is its own gang.")
    submit.add_argument(
        "--wait",
        type=at_least(0, float),
        default=0,
        metavar="SECONDS",
        help="Wait up to this long for them to be placed; exit 1 if one is still waiting then (it stays queued).",
    )
    submit.set_defaults(func=_submit)

    queue = _with_json(subparsers.add_parser("queue", help="Requests and their state."))
    queue.add_argument(
        "--all",
        action="store_true",
        help="Include the finished, failed, rejected and cancelled requests the controller keeps (the last 10,000).",
    )
    queue.add_argument("--team", help="Only this team's requests.")
    queue.add_argument(
        "--state",
        action="append",
        choices=[state.value for state in RequestState],
        help="Only requests in this state (repeat for several); a final state includes the kept final requests.",
    )
    queue.set_defaults(func=_queue)

    for name, help_text, handler in (
        ("request", "One request in full: state, reason, placement, progress.", _request),
        ("cancel", "Cancel a request and release what it holds.", _cancel),
        ("preempt", "Take a request off its nodes and requeue it (admin).", _preempt),
    ):
        command = _with_json(subparsers.add_parser(name, help=help_text))
        command.add_argument("id", help="Request id (see `llmos queue`).")
        command.set_defaults(func=handler)

    _with_json(subparsers.add_parser("nodes", help="Schedulable nodes with llmos's allocations.")).set_defaults(
        func=_nodes
    )
    _with_json(subparsers.add_parser("utilization", help="Share of each pool llmos has placed.")).set_defaults(
        func=_utilization
    )
    for name, help_text, handler in (
        ("cordon", "Stop placing new work on a node.", _cordon),
        ("uncordon", "Allow placing on a node again.", _uncordon),
        ("drain", "Cordon a node and requeue what runs there.", _drain),
    ):
        command = _with_json(subparsers.add_parser(name, help=help_text))
        command.add_argument("node", help="Node name (see `llmos nodes`).")
        command.set_defaults(func=handler)

    quota = _with_json(subparsers.add_parser("quota", help="Show or change team quotas (alone: show)."))
    quota.set_defaults(func=_quota_show)
    quota_commands = quota.add_subparsers(dest="quota_command", metavar="COMMAND", required=False)
    _with_json(quota_commands.add_parser("show", help="Quota and use per team."), under_group=True).set_defaults(
        func=_quota_show
    )
    quota_set = _with_json(
        quota_commands.add_parser("set", help="Set quota keys: llmos quota set TEAM gpu=8 cpu=-"), under_group=True
    )
    quota_set.add_argument("team")
    quota_set.add_argument("changes", nargs="+", help="key=amount, or key=- to remove the limit.")
    quota_set.set_defaults(func=_quota_set)

    audit = _with_json(subparsers.add_parser("audit", help="Who did what through the admin API (admin only)."))
    audit.add_argument("--limit", type=at_least(0), default=50, help="Newest N entries (0: all).")
    audit.set_defaults(func=_audit)

    decisions = _with_json(subparsers.add_parser("decisions", help="The placement decision log, with reasons."))
    decisions.add_argument("--request", help="Only this request's decisions.")
    decisions.add_argument("--limit", type=at_least(0), default=30, help="Newest N (0: all).")
    decisions.set_defaults(func=_decisions)


def register_pools_list(pools_commands: argparse._SubParsersAction) -> None:
    """`llmos pools list`, added to the `pools` group the manifests commands own."""
    _with_json(pools_commands.add_parser("list", help="Pools with capacity and free resources.")).set_defaults(
        func=_pools_list
    )


# -- handlers ---------------------------------------------------------------------------------------------


def _controller_start(args: argparse.Namespace) -> int:
    from cluster.admin import Admin
    from cluster.controller import DEFAULT_POLICY
    from cluster.controller import get as get_controller
    from cluster.inventory import connect

    connect(args.address)
    if get_controller() is not None:
        raise UserError("a controller is already running; `llmos controller status` shows it")
    admin = Admin(
        args.address,
        spec=args.spec,
        state_dir=args.state_dir,
        policy=args.policy or DEFAULT_POLICY,
        remove_unknown_groups=args.remove_unknown_groups,
        scale_up=args.scale_up,
        credential=_credential(args),
    )
    info = admin.ping()
    if args.json:
        print_json(info)
    else:
        scaling = ", scaling pools up on demand" if info["scale_up"] else ""
        stdout.print(f"controller started: policy {info['policy']}{scaling}, state in {info['state_dir']}")
    return 0


def _controller_stop(args: argparse.Namespace) -> int:
    from cluster.controller import get as get_controller
    from cluster.inventory import connect

    connect(args.address)
    stopped = get_controller() is not None and _admin(args, start=False).stop_controller()
    if args.json:
        print_json({"stopped": stopped})
    else:
        stdout.print("controller stopped" if stopped else "no controller was running")
    return 0


def _controller_status(args: argparse.Namespace) -> int:
    info = _admin(args, start=False).ping()
    if args.json:
        print_json(info)
    else:
        uptime = time.time() - info["started_at"]
        stdout.print(
            f"running: policy {info['policy']}, {info['requests']} requests, {info['nodes']} nodes, "
            f"up {uptime:.0f}s, state in {info['state_dir']}"
        )
        if info["scale_up"]:
            asked = ", ".join(f"{pool} x{nodes}" for pool, nodes in info["scale_up_requested"].items())
            stdout.print(f"scaling pools up on demand; nodes asked of Ray's autoscaler: {asked or 'none'}")
        if info["state_lost"]:
            stdout.print(f"refusing every call: {info['state_lost']}", style="bold red")
    return 0


def _submit(args: argparse.Namespace) -> int:
    requests = [parse_model(SubmitRequest, load_yaml(path), path) for path in args.request]
    admin = _admin(args)
    statuses = admin.submit_many(requests)
    if args.wait:
        ids = ", ".join(status.id for status in statuses)
        try:
            statuses = admin.wait_many([status.id for status in statuses], timeout_s=args.wait)
        except (KeyboardInterrupt, UserError):
            # Accepted already, and not withdrawn: the ids are what the user needs to follow or cancel them.
            stderr.print(
                f"submitted {ids}, not withdrawn: `llmos request ID` shows one, `llmos cancel ID` withdraws it"
            )
            raise
    if args.json:
        print_json(statuses)  # a list however many files: a script reads one shape
    else:
        for status in statuses:
            _print_request(status, as_json=False)
    unplaced = [status.id for status in statuses if status.state.waiting] if args.wait else []
    if unplaced:
        stderr.print(
            f"still waiting after {args.wait:g}s: {', '.join(unplaced)} (queued still; `llmos cancel ID` withdraws one)"
        )
    return 1 if unplaced or any(status.state.value in ("rejected", "failed") for status in statuses) else 0


def _queue(args: argparse.Namespace) -> int:
    statuses = _admin(args).queue(include_finished=args.all, team=args.team, states=args.state)
    if args.json:
        print_json(statuses)
        return 0
    print_table(
        None,
        ["id", "team", "kind", "priority", "state", "bundles", "nodes", "reason"],
        [
            [
                s.id,
                s.team,
                s.request.kind.value,
                s.priority_value,
                s.state.value,
                len(s.request.gang.bundles),
                ",".join(sorted(set(s.nodes))),
                s.reason,
            ]
            for s in statuses
        ],
        empty="no requests"
        if args.all or args.state
        else "no requests waiting or placed (--all lists the finished too)",
    )
    return 0


def _print_request(status: RequestStatus, as_json: bool) -> None:
    if as_json:
        print_json(status)
        return
    stdout.print(f"{status.id}: {status.state.value}" + (f" ({status.reason})" if status.reason else ""))
    for bundle in status.bundles:
        devices = f" GPU devices {bundle.gpu_devices}" if bundle.gpu_devices else ""
        held_by = bundle.group_bundle_index
        shared = f" in Ray bundle {held_by}" if held_by != bundle.bundle_index else ""
        stdout.print(f"  bundle {bundle.bundle_index} -> {bundle.node} {bundle.resources}{devices}{shared}")
    if status.details:
        stdout.print(f"  progress: {status.details}")


def _request(args: argparse.Namespace) -> int:
    status = _admin(args).status(args.id)
    _print_request(status, args.json)
    if not args.json:
        for line in request_facts(status, time.time()):
            stdout.print(f"  {line}")
    return 0


def request_facts(status: RequestStatus, now: float) -> list[str]:
    """What `llmos request ID` adds to the state and placement: who, what, when, and its group."""
    request, gang = status.request, status.request.gang
    priority = f"{request.priority} ({status.priority_value})" if request.priority else f"{status.priority_value}"
    facts = [
        f"team {request.team}, {request.kind.value}, priority {priority}"
        + ("" if request.preemptible else ", not preemptible")
        + (f", group {request.group}" if request.group else ""),
        f"gang {gang.name}: {len(gang.bundles)} bundle{'s' if len(gang.bundles) > 1 else ''}, "
        f"{gang.constraint.value}, group_bundles {request.group_bundles.value}",
    ]

    def clock(at: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))

    when = f"submitted {clock(status.submitted_at)}"
    if status.placed_at is None:
        if status.state.waiting:
            when += f", waiting {now - status.submitted_at:.0f}s"
    elif status.state.waiting:  # requeued: placed before
        when += f", last placed {clock(status.placed_at)}"
    else:
        when += f", placed {clock(status.placed_at)} ({status.placed_at - status.submitted_at:.1f}s later)"
    if status.finished_at is not None:
        when += f", ended {clock(status.finished_at)}"
    facts.append(when)
    if status.preemptions or status.failures:
        facts.append(
            f"taken off its nodes: preempted or drained {status.preemptions} time(s), by a node leaving "
            f"{status.failures} time(s)"
        )
    if status.placement_group:
        facts.append(f"Ray placement group {status.placement_group} (namespace llmos)")
    return facts


def _cancel(args: argparse.Namespace) -> int:
    _print_request(_admin(args).cancel(args.id), args.json)
    return 0


def _preempt(args: argparse.Namespace) -> int:
    _print_request(_admin(args).preempt(args.id), args.json)
    return 0


def _nodes(args: argparse.Namespace) -> int:
    nodes = _admin(args).nodes()
    if args.json:
        print_json(nodes)
        return 0
    print_table(
        None,
        ["node", "pool", "GPU used/total", "TPU used/total", "CPU used/total", "state", "requests"],
        [
            [
                n.name,
                n.pool,
                f"{n.allocated.get('GPU', 0):g}/{n.capacity['GPU']:g}" if n.capacity["GPU"] else "-",
                f"{n.allocated.get('TPU', 0):g}/{n.capacity['TPU']:g}" if n.capacity["TPU"] else "-",
                f"{n.allocated.get('CPU', 0):g}/{n.capacity['CPU']:g}",
                "drained" if n.drained else "cordoned" if n.cordoned else "schedulable",
                ", ".join(n.requests),
            ]
            for n in nodes
        ],
    )
    return 0


def _pools_list(args: argparse.Namespace) -> int:
    pools = _admin(args).pools()
    if args.json:
        print_json(pools)
        return 0
    print_table(
        None,
        ["pool", "accelerator", "nodes", "GPU free/total", "TPU free/total", "CPU free/total"],
        [
            [
                p.name,
                f"{p.accelerator} {p.accelerator_type or ''}".strip(),
                f"{p.nodes_alive} of {p.nodes_max}" if p.nodes_max else p.nodes_alive,
                *(
                    f"{p.free.get(key, 0):g}/{p.total[key]:g}" if p.total.get(key) else "-"
                    for key in ("GPU", "TPU", "CPU")
                ),
            ]
            for p in pools
        ],
    )
    return 0


def _utilization(args: argparse.Namespace) -> int:
    rows = _admin(args).utilization()
    if args.json:
        print_json(rows)
        return 0
    print_table(
        None,
        ["pool", "nodes", "GPU", "TPU", "CPU"],
        [
            [
                r.pool,
                r.nodes,
                *(
                    f"{r.allocated.get(k, 0):g}/{r.capacity[k]:g} ({100 * r.utilization[k]:.0f}%)"
                    if r.capacity.get(k)
                    else "-"
                    for k in ("GPU", "TPU", "CPU")
                ),
            ]
            for r in rows
        ],
    )
    return 0


def _control_output(args: argparse.Namespace, result, message: str) -> int:
    if args.json:
        print_json(result)
    else:
        stdout.print(message)
    return 0


def _cordon(args: argparse.Namespace) -> int:
    return _control_output(args, _admin(args).cordon(args.node), f"{args.node} cordoned: no new work lands there")


def _uncordon(args: argparse.Namespace) -> int:
    return _control_output(args, _admin(args).uncordon(args.node), f"{args.node} is schedulable again")


def _drain(args: argparse.Namespace) -> int:
    moved = _admin(args).drain(args.node)
    return _control_output(
        args, {"node": args.node, "requeued": moved}, f"{args.node} drained; requeued {', '.join(moved) or 'nothing'}"
    )


def _quota_show(args: argparse.Namespace) -> int:
    usage = _admin(args).usage()
    if args.json:
        print_json(usage)
        return 0
    print_table(
        None,
        ["team", "quota", "used"],
        [
            [
                u.team,
                _amounts(u.quota) or "unlimited",
                _amounts(u.used) or "-",
            ]
            for u in usage
        ],
    )
    return 0


def _quota_set(args: argparse.Namespace) -> int:
    changes: dict[str, float | None] = {}
    for item in args.changes:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"{item!r}: write KEY=NUMBER, e.g. gpu=8 or memory=32Gi, or KEY=- to remove the limit")
        try:
            # The forms a ClusterSpec's quota takes: a number, and for memory also a quantity like 32Gi.
            changes[key] = None if value == "-" else parse_memory(value) if key == "memory" else float(value)
        except ValueError:
            example = "memory=32Gi" if key == "memory" else f"{key}=8"
            raise UserError(
                f"{item!r}: {value!r} is not {'a memory size' if key == 'memory' else 'a number'}; "
                f"write KEY=NUMBER, e.g. {example}, or {key}=- to remove the limit"
            ) from None
    usage = _admin(args).set_quota(args.team, **changes)
    return _control_output(args, usage, f"{usage.team}: quota {_amounts(usage.quota) or 'unlimited'}")


def _amounts(amounts: dict[str, float]) -> str:
    """`gpu=8, memory=32Gi`: as `quota set` takes them (memory as bytes with :g would read 3.43597e+10)."""
    return ", ".join(
        f"{key}={format_memory(int(amount)) if key == 'memory' else f'{amount:g}'}" for key, amount in amounts.items()
    )


def _decisions(args: argparse.Namespace) -> int:
    records = _admin(args).decisions(limit=args.limit, request_id=args.request)
    if args.json:
        print_json(records)
        return 0
    print_table(
        None,
        ["#", "time", "request", "action", "reason"],
        [
            [r.seq, time.strftime("%H:%M:%S", time.localtime(r.time)), r.request_id, r.action.value, r.reason]
            for r in records
        ],
        empty="no decisions yet",
    )
    return 0


def _audit(args: argparse.Namespace) -> int:
    entries = _admin(args, start=False).audit_log(args.limit)
    if args.json:
        print_json(entries)
        return 0
    print_table(
        None,
        ["time", "principal", "action", "target", "outcome", "reason"],
        [
            [
                time.strftime("%H:%M:%S", time.localtime(e["time"])),
                e["principal"],
                e["action"],
                e["target"],
                e["outcome"],
                e.get("reason", ""),
            ]
            for e in entries
        ],
    )
    return 0
