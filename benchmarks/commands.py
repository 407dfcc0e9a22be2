"""`llmos bench ...`: reproducible benchmarks that write JSON for scripts and PNG for people."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from cluster.console import UserError, at_least, output_file, print_table, progress

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACE_DIR = REPO_ROOT.parent / "shared" / "data" / "alibaba-gpu-2023"


MAX_SEEDS = 1000


def parse_seeds(text: str) -> list[int]:
    """`42-51`, `42,45,47` or `42`; each seed once, each range from low to high."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            first, dash, last = part.strip().partition("-")
            first_seed, last_seed = int(first), int(last if dash else first)
            if last_seed < first_seed:
                raise UserError(
                    f"--seeds {text!r}: the range {part.strip()} runs backwards; write {last_seed}-{first_seed}"
                )
            if last_seed - first_seed >= MAX_SEEDS - len(seeds):
                raise UserError(f"--seeds {text!r} names more than {MAX_SEEDS} seeds; give fewer")
            seeds.extend(range(first_seed, last_seed + 1))
    except ValueError:
        raise UserError(f"--seeds {text!r}: write a range like 42-51, a list like 42,43 or one seed") from None
    # A seed given twice would count twice in every mean.
    repeated = sorted(seed for seed, times in Counter(seeds).items() if times > 1)
    if repeated:
        raise UserError(f"--seeds {text!r} names {', '.join(map(str, repeated))} more than once; give each seed once")
    return seeds


def write_json(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench", help="Run benchmarks; each prints JSON (--json writes it), most draw a PNG (--plot)."
    )
    benchmarks = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    _register_placement(benchmarks)
    _register_binding(benchmarks)
    _register_serve(benchmarks)
    _register_train(benchmarks)
    _register_faults(benchmarks)


def _register_placement(benchmarks: argparse._SubParsersAction) -> None:
    from cluster.placement import POLICIES

    placement = benchmarks.add_parser(
        "placement",
        help="Replay the Alibaba GPU trace (FGD paper procedure) against placement policies.",
        description="Tasks sampled from a pod list arrive one at a time on the empty 1,213-node GPU cluster "
        "until their GPU request reaches 130% of capacity; nothing departs; a task that does not fit fails.",
    )
    placement.add_argument(
        "--trace",
        default="default",
        help="A pod list name (default, gpushare40, multigpu50, ...: openb_pod_list_<name>.csv in the trace "
        "dir) or a path to a CSV with the same columns.",
    )
    placement.add_argument(
        "--policy",
        action="append",
        choices=list(POLICIES),
        help="A policy to run; repeat for several. Default: all of them.",
    )
    placement.add_argument("--seeds", default="42-51", help="Seeds: a range (42-51), a list (42,43) or one.")
    placement.add_argument("--json", type=output_file, help="Write the results as JSON to this file.")
    placement.add_argument("--plot", type=output_file, help="Write the allocation-vs-arrived plot (PNG) to this file.")
    placement.add_argument(
        "--trace-dir",
        type=Path,
        default=DEFAULT_TRACE_DIR,
        help="Folder with the openb_*.csv files (default: ../shared/data/alibaba-gpu-2023 next to the repo).",
    )
    placement.add_argument(
        "--nodes",
        type=int,
        help="Replay on a synthetic cluster of this many nodes, cycling through the trace's node list "
        "(arrivals scale with it); for throughput at scale, e.g. --nodes 10000.",
    )
    placement.set_defaults(func=_placement)


def _placement(args: argparse.Namespace) -> int:
    from benchmarks.placement import describe_seeds, plot, report, run_policy
    from benchmarks.placement_trace import load_trace
    from cluster.placement import POLICIES

    seeds = parse_seeds(args.seeds)
    if args.nodes is not None and args.nodes < 1:
        raise UserError(f"--nodes {args.nodes}: give a positive node count, e.g. 10000")
    trace = load_trace(args.trace, args.trace_dir, nodes=args.nodes)
    policies = list(dict.fromkeys(args.policy or POLICIES))
    progress(
        f"{trace.name}: {len(trace.cluster.nodes)} nodes, {trace.gpus} GPUs, "
        f"{len(policies)} policies x {len(seeds)} seeds"
    )
    results = {}
    for policy in policies:
        results[policy] = run_policy(
            trace,
            policy,
            seeds,
            on_seed=lambda seed, run, policy=policy: progress(
                f"  {policy} seed {seed}: {run.gpu_alloc_ratio:.2%} allocated, "
                f"{run.decisions / run.seconds:,.0f} decisions/s"
            ),
        )
    document = report(trace, seeds, results)
    # The table first: a file that cannot be written after all loses nothing.
    print_table(
        f"{trace.name}: mean of seeds {describe_seeds(seeds)}",
        ["policy", "GPU alloc", "unallocated GPUs", "frag rate @90%", "first failure", "decisions/s"],
        [
            [
                policy,
                f"{row['gpu_alloc_ratio']:.2%}",
                f"{row['unallocated_gpus']:.0f}",
                _share_of_seeds(row["frag_rate_at_90"], row["frag_rate_seeds"], len(seeds), "90% never arrived"),
                _share_of_seeds(row["first_failure_arrived"], row["first_failure_seeds"], len(seeds), "none failed"),
                f"{row['decisions_per_s']:,.0f}",
            ]
            for policy, row in document["results"].items()
        ],
    )
    if args.json:
        write_json(args.json, document)
        progress(f"wrote {args.json}")
    if args.plot:
        plot(args.plot, trace, seeds, results)
        progress(f"wrote {args.plot}")
    return 0


def _share_of_seeds(mean: float | None, measured: int, seeds: int, when_none: str) -> str:
    """A mean as a percentage, saying over how many seeds when some had no value."""
    if mean is None:
        return when_none
    return f"{mean:.1%}" if measured == seeds else f"{mean:.1%} ({measured} of {seeds} seeds)"


def _register_binding(benchmarks: argparse._SubParsersAction) -> None:
    from benchmarks.binding import MODES
    from cluster.placement import POLICIES

    binding = benchmarks.add_parser(
        "binding",
        help="Placement groups per second: directly with Ray vs through the llmos controller.",
        description="Starts its own local cluster from the ClusterSpec, measures both paths in interleaved rounds "
        "(by default for 1-bundle and 8-bundle gangs, one at a time and batched), and stops the cluster.",
    )
    binding.add_argument("--spec", type=Path, default=REPO_ROOT / "examples" / "cluster.yaml", help="ClusterSpec.")
    binding.add_argument("--count", type=at_least(1), default=50, help="Placement groups per round and path.")
    binding.add_argument("--rounds", type=at_least(1), default=3, help="Interleaved rounds.")
    binding.add_argument(
        "--runs",
        type=at_least(1),
        default=1,
        help="Runs, each on a fresh cluster (default 1); the intervals then cover the spread between runs too.",
    )
    binding.add_argument(
        "--sizes", default="1,8", help="Bundles per gang, comma-separated (default 1,8): fewer make a run shorter."
    )
    binding.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"Modes, comma-separated, of {', '.join(MODES)} (default both); the headline is batched's when measured.",
    )
    binding.add_argument(
        "--policy", default="llmos", choices=list(POLICIES), help="Placement policy of the controller."
    )
    binding.add_argument("--json", type=output_file, help="Write the results as JSON to this file.")
    binding.add_argument(
        "--plot", type=output_file, help="Write each path's rate against Ray's own, with 95%% intervals (PNG), here."
    )
    binding.set_defaults(func=_binding)


def _binding(args: argparse.Namespace) -> int:
    from benchmarks.binding import MODES, plot, run

    modes = tuple(dict.fromkeys(mode.strip() for mode in args.modes.split(",")))
    if not modes or not set(modes) <= set(MODES):
        raise UserError(f"--modes {args.modes!r}: give one or both of {', '.join(MODES)}, comma-separated")
    try:
        sizes = tuple(dict.fromkeys(int(size) for size in args.sizes.split(",")))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise UserError(f"--sizes {args.sizes!r}: give bundles per gang as positive integers, e.g. 1,8")
    result = run(
        args.spec,
        sizes=sizes,
        modes=modes,
        count=args.count,
        rounds=args.rounds,
        runs=args.runs,
        policy=args.policy,
        on_progress=progress,
    )
    if args.plot:
        plot(result, args.plot)
        progress(f"wrote {args.plot}")
    return _report(result, args.json)


def _register_serve(benchmarks: argparse._SubParsersAction) -> None:
    serve = benchmarks.add_parser(
        "serve",
        help="The completions API under bounded load at concurrency 1, 8, 32: batched vs unbatched, Serve vs direct.",
    )
    serve.add_argument("--checkpoint", type=Path, help="Checkpoint to serve (default: train a small one first).")
    serve.add_argument("--requests", type=at_least(1), default=64, help="Requests per concurrency level and mode.")
    serve.add_argument("--json", type=output_file, help="Write the results as JSON to this file.")
    serve.add_argument("--plot", type=output_file, help="Write latency and throughput against concurrency (PNG) here.")
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from benchmarks.serve import run

    result = run(
        checkpoint=args.checkpoint, requests_per_level=args.requests, plot_path=args.plot, on_progress=progress
    )
    return _report(result, args.json)


def _register_train(benchmarks: argparse._SubParsersAction) -> None:
    train = benchmarks.add_parser(
        "train",
        help="Ray Train overhead vs bare processes; recovery from a killed worker and from a removed node.",
        description="Starts its own local cluster, trains small jobs on it (through the controller and with "
        "ray job submit), kills a worker, stops a node's raylet and adds it back, and stops the cluster.",
    )
    train.add_argument("--spec", type=Path, default=REPO_ROOT / "examples" / "cluster.yaml", help="ClusterSpec.")
    train.add_argument("--workers", type=at_least(1), default=2, help="Workers for the overhead comparison.")
    train.add_argument("--json", type=output_file, help="Write the results as JSON to this file.")
    train.add_argument("--plot", type=output_file, help="Write the loss curve of the worker-kill run (PNG) here.")
    train.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from benchmarks.train import run

    result = run(args.spec, workers=args.workers, plot_path=args.plot, on_progress=progress)
    return _report(result, args.json)


def _register_faults(benchmarks: argparse._SubParsersAction) -> None:
    faults = benchmarks.add_parser(
        "faults",
        help="Faults survived, requests lost, quotas under load, inputs fuzzed (what `make faults` runs).",
        description="Starts its own local cluster with --teams teams, kills the controller with requests placed and "
        "queued, removes a node under a training gang and a serving replica, interrupts checkpoint writes, fills "
        "the checkpoint disk, submits --load requests from every team at once, runs the input fuzzers.",
    )
    faults.add_argument("--teams", type=at_least(1), default=20, help="Teams in the load test (default 20).")
    faults.add_argument("--load", type=at_least(1), default=10_000, help="Requests in the load test (default 10,000).")
    faults.add_argument(
        "--queued", type=at_least(1), default=100, help="Requests queued when the controller is killed."
    )
    faults.add_argument("--placed", type=at_least(1), default=10, help="Requests placed when the controller is killed.")
    faults.add_argument("--no-fuzz", action="store_true", help="Skip the input fuzzers.")
    faults.add_argument(
        "--http-examples",
        type=at_least(0),
        default=100,
        help="Schemathesis examples per API operation against a deployed completions app (0 skips it).",
    )
    faults.add_argument("--json", type=output_file, help="Write the report as JSON to this file.")
    faults.set_defaults(func=_faults)


def _faults(args: argparse.Namespace) -> int:
    from benchmarks.faults import run

    if args.load < args.teams:
        raise UserError(f"--load {args.load} is fewer than --teams {args.teams}: give each team a request at least")
    result = run(
        teams=args.teams,
        load_requests=args.load,
        queued=args.queued,
        placed=args.placed,
        run_fuzz=not args.no_fuzz,
        http_examples=args.http_examples,
        on_progress=progress,
    )
    return _report(result, args.json)


def _report(result: dict, json_path: Path | None) -> int:
    """Write the benchmark's JSON where asked, and print it for scripts either way."""
    from cluster.console import print_json

    print_json(result)  # first: a file that cannot be written after all loses nothing
    if json_path:
        write_json(json_path, result)
    return 0
