"""`llmos spec validate`, `llmos up`, `llmos down`, `llmos status`, `llmos env`."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from pydantic import BaseModel
from rich.markup import escape

from cluster.console import (
    UserError,
    at_least,
    human_bytes,
    port_number,
    print_hint,
    print_json,
    print_table,
    progress,
    stdout,
)
from cluster.launcher import (
    DEFAULT_DASHBOARD_PORT,
    DEFAULT_GCS_PORT,
    DEFAULT_OBJECT_STORE_MB,
    RAY_MIN_OBJECT_STORE_MB,
    LocalCluster,
)
from cluster.spec import ClusterSpec, SpecError, load_spec, load_yaml, parse_model, workload_problems

DEFAULT_SPEC = Path("examples/cluster.yaml")
# The kinds of llmos YAML file, in the order `llmos spec validate` tries them, and what takes each.
KIND_USES = {
    "cluster": "`llmos up FILE` or `llmos manifests render FILE`",
    "training": "`python -m jobs.train FILE` or `llmos manifests render CLUSTER --job FILE`",
    "serving": "`llmos serve deploy FILE` or `llmos manifests render CLUSTER --serve FILE`",
    "request": "`llmos submit FILE`",
}
SPEC_KINDS = tuple(KIND_USES)


def register(subparsers: argparse._SubParsersAction) -> None:
    spec = subparsers.add_parser("spec", help="Check llmos YAML files: ClusterSpecs, jobs, requests.")
    spec_commands = spec.add_subparsers(dest="spec_command", metavar="COMMAND", required=True)
    validate = spec_commands.add_parser(
        "validate",
        help="Check an llmos YAML file (a ClusterSpec, TrainingJob, ServeJob or request); print its problems or 'ok'.",
    )
    validate.add_argument("spec", help="Path to the YAML file.")
    validate.add_argument(
        "--kind",
        choices=[*SPEC_KINDS, "auto"],
        default="auto",
        help="What the file is; auto (the default): the kind it is valid as, else the kind it comes closest to.",
    )
    validate.add_argument(
        "--cluster",
        help="A ClusterSpec to check a TrainingJob or ServeJob against: its team, priority class and pool "
        "exist, and one worker or replica fits on a node.",
    )
    validate.add_argument("--json", action="store_true", help="Print {ok, kind, problems} as JSON.")
    validate.set_defaults(func=_spec_validate)

    up = subparsers.add_parser("up", help="Start a local multi-node Ray cluster on loopback from a ClusterSpec.")
    up.add_argument("spec", nargs="?", default=str(DEFAULT_SPEC), help=f"ClusterSpec YAML (default {DEFAULT_SPEC}).")
    up.add_argument(
        "--nodes-per-pool",
        type=at_least(1),
        default=1,
        help="Simulated nodes per pool (TPU pools: whole slices), capped by each pool's max (default 1).",
    )
    up.add_argument("--port", type=port_number, default=DEFAULT_GCS_PORT, help="GCS port on 127.0.0.2.")
    up.add_argument(
        "--dashboard-port", type=port_number, default=DEFAULT_DASHBOARD_PORT, help="Dashboard/job server port."
    )
    up.add_argument(
        "--object-store-mb",
        type=at_least(RAY_MIN_OBJECT_STORE_MB),
        default=DEFAULT_OBJECT_STORE_MB,
        help=f"Object store per node (Ray's minimum: {RAY_MIN_OBJECT_STORE_MB}).",
    )
    up.add_argument(
        "--redis-address",
        help="host:port of a Redis server for Ray's GCS fault tolerance: the head can restart and keep the cluster.",
    )
    up.add_argument("--json", action="store_true", help="Print the started cluster as JSON.")
    up.set_defaults(func=_up)

    down = subparsers.add_parser("down", help="Stop exactly the processes `llmos up` started.")
    down.set_defaults(func=_down)

    status = subparsers.add_parser("status", help="Pools and nodes of the live cluster: capacity and free resources.")
    status.add_argument("--address", help="GCS address of another cluster (default: the local one).")
    status.add_argument("--json", action="store_true", help="Print {pools, nodes} as JSON.")
    status.set_defaults(func=_status)

    env = subparsers.add_parser("env", help="Shell exports for `ray job submit` against the local cluster.")
    env.set_defaults(func=_env)


def _spec_models() -> dict[str, type[BaseModel]]:
    from cluster.requests import SubmitRequest
    from jobs.spec import TrainingJob
    from serving.spec import ServeJob

    return {"cluster": ClusterSpec, "training": TrainingJob, "serving": ServeJob, "request": SubmitRequest}


def other_kind_hint(error: SpecError) -> str:
    """For a file refused as one kind of llmos file that is valid as another: which kind, and what takes
    it (a ClusterSpec passed to `llmos submit`, say); else nothing."""
    models = _spec_models()
    if error.kind not in {model.__name__ for model in models.values()}:
        return ""  # not refused as a whole kind of file (a job checked against a cluster, a checkpoint)
    try:
        data = load_yaml(error.source)
    except SpecError:
        return ""
    for kind, model in models.items():
        if model.__name__ == error.kind:
            continue
        try:
            parse_model(model, data, error.source)
        except SpecError:
            continue
        return f"{error.source} is a valid {model.__name__}: give it to {KIND_USES[kind]}"
    return ""


def _spec_validate(args: argparse.Namespace) -> int:
    try:
        return _validate_file(args)
    except (SpecError, UserError) as error:
        if not args.json:
            raise
        # --json promises JSON on stdout, also for a file that cannot be read or a --cluster that is no ClusterSpec.
        problems = (
            [f"{error.source}: {problem}" for problem in error.problems]
            if isinstance(error, SpecError)
            else [str(error)]
        )
        print_json({"ok": False, "kind": None, "problems": problems})
        return 2


def _validate_file(args: argparse.Namespace) -> int:
    data = load_yaml(args.spec)
    models = _spec_models()
    kinds = list(SPEC_KINDS) if args.kind == "auto" else [args.kind]
    failures: dict[str, SpecError] = {}
    for kind in kinds:
        try:
            parsed = parse_model(models[kind], data, args.spec)
        except SpecError as error:
            failures[kind] = error
            continue
        problems = _problems_against(parsed, kind, args.cluster)
        if problems:
            failures = {kind: SpecError(args.spec, problems, f"{models[kind].__name__} for {args.cluster}")}
            break
        if args.json:
            print_json({"ok": True, "kind": kind, "problems": []})
        else:
            stdout.print(f"ok: a {models[kind].__name__}" + (f", fit for {args.cluster}" if args.cluster else ""))
        return 0
    kind, error = _closest_kind(data, failures, models)
    if args.json:
        print_json({"ok": False, "kind": kind, "problems": error.problems})
    else:
        stdout.print(str(error))
        if args.kind != "auto":  # else every kind was tried: none to point to
            print_hint(other_kind_hint(error))
    return 1


def _closest_kind(
    data: object, failures: dict[str, SpecError], models: dict[str, type[BaseModel]]
) -> tuple[str, SpecError]:
    """The kind a broken file comes closest to: the one that knows most of its top-level keys, then the one
    with the fewest problems. By problems alone, a ClusterSpec with many broken fields read as a ServeJob."""
    keys = set(data) if isinstance(data, dict) else set()

    def distance(failure: tuple[str, SpecError]) -> tuple[int, int]:
        kind, error = failure
        return -len(keys & set(models[kind].model_fields)), len(error.problems)

    return min(failures.items(), key=distance)


def _problems_against(parsed: BaseModel, kind: str, cluster_path: str | None) -> list[str]:
    """What keeps a valid job from ever running on the cluster of `cluster_path` (none without one)."""
    if cluster_path is None:
        return []
    if kind not in ("training", "serving"):
        raise UserError(f"--cluster checks a TrainingJob or ServeJob; {parsed.__class__.__name__} is neither")
    unit = "worker" if kind == "training" else "replica"
    return workload_problems(parsed, load_spec(cluster_path), unit)  # type: ignore[arg-type]


def _up(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    cluster = LocalCluster.up(
        spec,
        replicas_per_pool=args.nodes_per_pool,
        gcs_port=args.port,
        dashboard_port=args.dashboard_port,
        object_store_mb=args.object_store_mb,
        redis_address=args.redis_address,
        on_progress=progress,
    )
    if args.json:
        print_json(
            {
                "cluster": spec.name,
                "address": cluster.gcs_address,
                "dashboard": cluster.dashboard_url,
                "nodes": [{"name": n.name, "pool": n.pool, "pid": n.pid} for n in cluster.record.nodes],
            }
        )
    else:
        stdout.print(
            f"cluster [bold]{escape(spec.name)}[/] is up: {len(cluster.record.nodes)} nodes, "
            f"GCS {cluster.gcs_address}, dashboard and job server {cluster.dashboard_url}\n"
            'next: `llmos status`; for `ray job submit`, first run `eval "$(llmos env)"`',
            markup=True,
        )
    return 0


def _down(args: argparse.Namespace) -> int:
    cluster = LocalCluster.find()
    if cluster is None:
        stdout.print("no local cluster is running")
        return 0
    count = len(cluster.record.nodes)
    stopped = cluster.down(on_progress=progress)
    of = f"{stopped} of {count}" if stopped != count else f"{count}"
    stdout.print(f"stopped {of} nodes of {cluster.record.cluster_name}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from cluster.inventory import connect, read_nodes, summarize_pools

    connect(args.address)
    nodes = read_nodes()
    pools = summarize_pools(nodes)
    local = LocalCluster.find() if args.address is None else None
    memory = local.memory_by_node() if local else {}
    if args.json:
        print_json(
            {
                "pools": pools,
                "nodes": [
                    {**node.model_dump(mode="json"), "process_pss_bytes": memory.get(node.name)} for node in nodes
                ],
            }
        )
        return 0
    print_table(
        "Pools",
        [
            "pool",
            "accelerator",
            "nodes",
            "CPU free/total",
            "GPU free/total",
            "TPU free/total",
            "memory free/total",
        ],
        [
            [
                pool.name,
                f"{pool.accelerator} {pool.accelerator_type or ''}".strip(),
                f"{pool.nodes_alive}" + (f" (+{pool.nodes_dead} dead)" if pool.nodes_dead else ""),
                *(_free_of_total(pool.free, pool.total, key) for key in ("CPU", "GPU", "TPU", "memory")),
            ]
            for pool in pools
        ],
    )
    print_table(
        "Nodes",
        ["node", "pool", "state", "CPU", "GPU", "TPU", "memory used (PSS)"],
        [
            [
                node.name,
                node.pool,
                "alive" if node.alive else "dead",
                *(_free_of_total(node.resources_free, node.resources_total, key) for key in ("CPU", "GPU", "TPU")),
                human_bytes(memory[node.name]) if node.name in memory else "",
            ]
            for node in nodes
        ],
    )
    return 0


def _free_of_total(free: dict[str, float], total: dict[str, float], key: str) -> str:
    if not total.get(key):
        return "-"
    if key == "memory":
        return f"{free.get(key, 0) / 2**30:.0f}/{total[key] / 2**30:.0f} GiB"
    return f"{free.get(key, 0):g}/{total[key]:g}"


def _env(args: argparse.Namespace) -> int:
    cluster = LocalCluster.find()
    if cluster is None:
        raise UserError("no local cluster is running; start one with `llmos up`")
    env = {**cluster.client_env(), "RAY_ADDRESS": cluster.dashboard_url}
    for key, value in env.items():
        print(f"export {key}={shlex.quote(value)}")  # for `eval`: a path may hold spaces or `$(...)`
    return 0
