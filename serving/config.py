"""Ray's own Serve config for a ServeJob: `llmos serve config` prints it for `serve deploy`, and
`llmos manifests render --serve` puts it into a RayService as `serveConfigV2`."""

from __future__ import annotations

from cluster.ray_mapping import POOL_LABEL, RAY_ACCELERATOR_TYPE_LABEL
from cluster.requests import BundleBinding, pin_any
from serving.spec import ServeJob

DEPLOYMENT = "CompletionServer"
IMPORT_PATH = "serving.app:build_app"


def replica_actor_options(job: ServeJob, booked: list[BundleBinding] | None = None) -> dict:
    """Ray actor options of one replica; `booked` pins replicas to the nodes the controller booked."""
    options: dict = {"num_cpus": job.resources.cpus, "memory": float(job.resources.memory)}
    if job.resources.gpus:
        options["num_gpus"] = job.resources.gpus
    if booked:
        options["label_selector"] = pin_any(booked)
    elif job.pool:
        options["label_selector"] = {POOL_LABEL: job.pool}
    elif job.accelerator_type:
        options["label_selector"] = {RAY_ACCELERATOR_TYPE_LABEL: job.accelerator_type}
    return options


def build_serve_config(job: ServeJob, *, host: str = "0.0.0.0", port: int = 8000) -> dict:
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": host, "port": port},
        "applications": [
            {
                "name": job.name,
                "route_prefix": job.route_prefix,
                "import_path": IMPORT_PATH,
                "args": {"job": job.model_dump(mode="json")},
                "deployments": [
                    {
                        "name": DEPLOYMENT,
                        "num_replicas": job.replicas.max,
                        "ray_actor_options": replica_actor_options(job),
                    }
                ],
            }
        ],
    }
