"""`llmos manifests render|validate` and `llmos pools import` (`pools list` comes from the admin commands)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cluster.admin_commands import register_pools_list
from cluster.console import UserError, print_json, print_table, stderr, stdout
from cluster.spec import load_spec
from manifests.objects import ManifestError, read_documents


def register(subparsers: argparse._SubParsersAction) -> None:
    manifests = subparsers.add_parser("manifests", help="KubeRay and Kueue manifests from a ClusterSpec.")
    commands = manifests.add_subparsers(dest="manifests_command", metavar="COMMAND", required=True)

    render = commands.add_parser(
        "render",
        help="Write the RayCluster, Kueue queues and NetworkPolicies of a ClusterSpec (and a RayJob/RayService).",
    )
    render.add_argument("spec", help="Path to a ClusterSpec YAML file.")
    render.add_argument("-o", "--output", required=True, help="Directory to write the manifests into.")
    render.add_argument("--job", help="A TrainingJob YAML file: also write its RayJob (queued in Kueue).")
    render.add_argument("--serve", help="A ServeJob YAML file: also write its RayService.")
    render.add_argument(
        "--deadline", type=int, metavar="SECONDS", help="RayJob activeDeadlineSeconds: the most the job may run."
    )
    render.add_argument(
        "--start-deadline",
        type=int,
        metavar="SECONDS",
        help="RayJob preRunningDeadlineSeconds: the most the job may take to start running.",
    )
    render.set_defaults(func=_render)

    validate = commands.add_parser(
        "validate", help="Check manifests against the KubeRay/Kueue CRDs and Kubernetes' schemas."
    )
    validate.add_argument("paths", nargs="+", help="YAML files, or directories of them.")
    validate.add_argument("--json", action="store_true", help="Print {ok, problems} as JSON.")
    validate.set_defaults(func=_validate)

    pools = subparsers.add_parser("pools", help="Work with the pools of a cluster.")
    pools.set_defaults(func=lambda args: _usage(pools))
    pool_commands = pools.add_subparsers(dest="pools_command", metavar="COMMAND", required=False)
    import_ = pool_commands.add_parser("import", help="Turn a KubeRay RayCluster manifest into a ClusterSpec.")
    import_.add_argument("manifest", help="YAML file holding a RayCluster.")
    import_.add_argument("-o", "--output", required=True, help="ClusterSpec YAML file to write.")
    import_.set_defaults(func=_import)
    register_pools_list(pool_commands)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _render(args: argparse.Namespace) -> int:
    from manifests.kueue import kueue_warnings
    from manifests.render import render_cluster, write_manifests
    from manifests.workloads import MAX_DEADLINE_SECONDS, ray_job, ray_service

    for flag, seconds in (("--deadline", args.deadline), ("--start-deadline", args.start_deadline)):
        if seconds is not None and not 1 <= seconds <= MAX_DEADLINE_SECONDS:
            raise UserError(f"{flag} {seconds}: give the seconds, 1 to {MAX_DEADLINE_SECONDS}, or leave it out")
        if seconds is not None and not args.job:
            raise UserError(f"{flag} bounds a RayJob: give the TrainingJob with --job")
    spec = load_spec(args.spec)
    try:
        files = render_cluster(spec)
        warnings = kueue_warnings(spec)
    except ManifestError as error:
        raise UserError(f"{args.spec}: {error}") from None
    if args.job:
        job, text = _load_training_job(args.job)
        try:
            files[f"rayjob-{job.name}.yaml"] = ray_job(
                spec, job, text, deadline_seconds=args.deadline, start_deadline_seconds=args.start_deadline
            )
        except ManifestError as error:
            raise UserError(f"{args.job} in {args.spec}: {error}") from None
    if args.serve:
        serve, config = _load_serve_job(args.serve)
        try:
            files[f"rayservice-{serve.name}.yaml"] = [ray_service(spec, serve, config)]
        except ManifestError as error:
            raise UserError(f"{args.serve} in {args.spec}: {error}") from None
    try:
        written, removed = write_manifests(files, args.output)
    except ManifestError as error:
        raise UserError(f"--output: {error}") from None
    for warning in warnings:
        stderr.print(f"warning: {warning}")
    print_table(
        f"Wrote {len(written)} files to {args.output}",
        ["file", "objects"],
        [(path.name, ", ".join(o["kind"] for o in files[path.name])) for path in written],
    )
    if removed:
        names = ", ".join(path.name for path in removed)
        stdout.print(f"removed what an earlier render wrote there and this one does not: {names}")
    stdout.print(f"check them with: llmos manifests validate {args.output}")
    return 0


def _load_training_job(path: str) -> tuple[Any, str]:
    from jobs.spec import load_training_job

    return load_training_job(path), Path(path).read_text()


def _load_serve_job(path: str) -> tuple[Any, dict[str, Any]]:
    try:
        from serving.config import build_serve_config
        from serving.spec import load_serve_job
    except ImportError as error:
        raise UserError(
            f"--serve needs serving.spec.load_serve_job and serving.config.build_serve_config ({error})"
        ) from None
    job = load_serve_job(path)
    return job, build_serve_config(job)


def _validate(args: argparse.Namespace) -> int:
    try:
        from manifests.validate import SchemaError, validate_documents
    except ImportError as error:
        raise UserError(f"validation needs the dev extras: pip install -e '.[dev]' ({error})") from None
    files = _yaml_files(args.paths)
    problems, count = [], 0
    try:
        for path in files:
            try:
                documents = read_documents(path)
            except ManifestError as error:
                problems.append(str(error))
                continue
            count += len(documents)
            problems += [f"{path}: {line}" for line in validate_documents(documents)]
    except SchemaError as error:
        raise UserError(str(error)) from None
    if args.json:
        print_json({"ok": not problems, "objects": count, "problems": problems})
    elif problems:
        stdout.print("\n".join(problems))
    else:
        stdout.print(f"ok: {count} objects in {len(files)} files")
    return 1 if problems else 0


def _yaml_files(paths: list[str]) -> list[Path]:
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{name}: no such file or directory")
    if not files:
        raise UserError(f"no .yaml files in {', '.join(paths)}")
    return files


def _import(args: argparse.Namespace) -> int:
    from manifests.importer import import_ray_cluster, skipped_groups, spec_to_yaml

    try:
        documents = [d for d in read_documents(args.manifest) if isinstance(d, dict)]
    except ManifestError as error:
        raise UserError(str(error)) from None
    clusters = [d for d in documents if d.get("kind") == "RayCluster"]
    if not clusters:
        kinds = ", ".join(sorted({str(d.get("kind")) for d in documents})) or "none"
        raise UserError(f"{args.manifest}: no RayCluster in it (kinds found: {kinds}); pass a KubeRay RayCluster")
    try:
        spec = import_ray_cluster(clusters[0], args.manifest)
    except ManifestError as error:
        raise UserError(f"{args.manifest}: {error}") from None
    try:
        Path(args.output).write_text(spec_to_yaml(spec))
    except OSError as error:
        raise UserError(f"--output {args.output}: {error.strerror}; give a file path you can write") from None
    for note in skipped_groups(clusters[0]):
        stderr.print(f"note: {note}")
    print_table(
        f"Wrote {args.output}",
        ["pool", "accelerator", "type", "node", "replicas"],
        [
            (
                pool.name,
                pool.accelerator.value,
                pool.accelerator_type or "",
                f"{pool.node.cpus} cpus, {pool.node.memory // 2**30} GiB"
                + (f", {pool.node.gpus} gpus" if pool.node.gpus else "")
                + (f", {pool.tpu.chips_per_host} chips x {pool.tpu.hosts_per_slice} hosts" if pool.tpu else ""),
                f"{pool.replicas.min}..{pool.replicas.max}",
            )
            for pool in spec.pools
        ],
    )
    return 0
