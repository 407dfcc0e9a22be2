"""The completions application on real Ray Serve, placed through the controller, on the shared cluster."""

from __future__ import annotations

import json
import socket
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import ray
import requests
from ray import serve
from ray.util.state import list_actors
from waiting import wait_for

from benchmarks.faults import http_fuzz
from cluster.admin import Admin
from cluster.console import UserError
from cluster.launcher import LocalCluster, free_port
from cluster.ray_mapping import POOL_LABEL
from cluster.requests import RequestState
from serving.deploy import delete, deploy
from serving.reconcile import find_reconciler
from serving.spec import ServeJob

TIMEOUT_S = 60


@pytest.fixture(scope="module")
def served(local_cluster: LocalCluster, tiny_lm_checkpoint: Path, tmp_path_factory):
    admin = Admin(state_dir=tmp_path_factory.mktemp("serve-controller"), policy="bestfit")
    job = ServeJob(
        name="tiny-lm",
        team="research",
        checkpoint=str(tiny_lm_checkpoint),
        replicas={"min": 1, "max": 2},
        resources={"cpus": 1, "gpus": 0.25},
        pool="a100",
        limits={"max_tokens": 16, "max_prompt_bytes": 64, "max_body_bytes": 2048},
    )
    deployment = deploy(job, admin, port=free_port(), wait_s=TIMEOUT_S)
    yield admin, job, deployment
    delete(job.name, admin)
    serve.shutdown()
    for status in admin.queue():
        admin.cancel(status.id)
    admin.stop_controller()


def port_of(deployment) -> int:
    """The port of the Serve proxy a deployment answers on: a second deployment goes behind the same one."""
    return int(deployment.url.split(":")[2].split("/")[0])


def research_job(name: str, checkpoint: Path, pool: str | None, **fields) -> ServeJob:
    """A small replica of the research team's, at its own route."""
    return ServeJob(
        name=name,
        team="research",
        checkpoint=str(checkpoint),
        pool=pool,
        route_prefix=f"/{name.removesuffix('-lm')}",
        **{"resources": {"cpus": 1}, **fields},
    )


def post(url: str, body: dict | bytes | Iterator[bytes], **kwargs) -> requests.Response:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    return requests.post(url, data=data, headers={"content-type": "application/json"}, timeout=TIMEOUT_S, **kwargs)


def test_completion_models_and_health(served):
    _, _, deployment = served
    response = post(deployment.url, {"model": "tiny-lm", "prompt": "def f(x):", "max_tokens": 8, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny-lm"
    assert body["choices"][0]["finish_reason"] in ("length", "stop")
    assert body["usage"]["prompt_tokens"] == len(b"def f(x):")
    assert 0 < body["usage"]["completion_tokens"] <= 8
    base = deployment.url.removesuffix("/v1/completions")
    assert requests.get(f"{base}/v1/models", timeout=TIMEOUT_S).json()["data"][0]["id"] == "tiny-lm"
    assert requests.get(f"{base}/healthz", timeout=TIMEOUT_S).json()["status"] == "ok"


def test_replicas_run_on_the_nodes_the_controller_booked(served):
    admin, _, deployment = served
    booked = {status.nodes[0] for status in admin.queue() if status.request.group == "tiny-lm"}
    assert booked == set(deployment.nodes) and deployment.replicas == 2
    names = {node.node_id: node.name for node in admin.nodes()}
    replicas = list_actors(
        filters=[("class_name", "=", "ServeReplica:tiny-lm:CompletionServer"), ("state", "=", "ALIVE")]
    )
    assert len(replicas) == 2
    assert {names[actor.node_id] for actor in replicas} <= booked


def test_every_bad_request_gets_a_4xx_and_the_replica_keeps_serving(served):
    _, _, deployment = served
    bad = [
        (b'{"model": "tiny-lm", "prompt": ', 400, "not valid JSON"),
        (b'{"model": "tiny-lm", "prompt": "\xff\xfe"}', 400, "not UTF-8"),
        ({"model": "tiny-lm", "prompt": "x", "temprature": 1}, 400, "unknown field"),
        ({"model": "tiny-lm", "prompt": "x" * 65}, 400, "the limit is 64"),
        ({"model": "tiny-lm", "prompt": "x", "max_tokens": 0}, 400, "max_tokens must be between 1 and 16"),
        ({"model": "tiny-lm", "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens must be between 1 and 16"),
        ({"model": "other", "prompt": "x"}, 404, "does not exist"),
        (b"{" + b" " * 4096 + b"}", 413, "the limit is 2048"),
    ]
    for body, status, message in bad:
        response = post(deployment.url, body)
        assert response.status_code == status, (body[:40], response.text)
        error = response.json()["error"]
        assert message in error["message"] and error["type"] == "invalid_request_error"
    # Chunked, with no length up front: refused once the limit is passed, not after reading it all.
    chunked = post(deployment.url, iter([b"{" + b" " * 1024] * 3 + [b"}"]))
    assert chunked.status_code == 413 and "over 2048 bytes" in chunked.json()["error"]["message"], chunked.text
    good = post(deployment.url, {"model": "tiny-lm", "prompt": "import", "max_tokens": 4})
    assert good.status_code == 200


def test_the_api_fuzzed_from_its_openapi_schema_never_answers_5xx(served):
    _, job, deployment = served
    base = deployment.url.removesuffix("/v1/completions")
    schema = requests.get(f"{base}/openapi.json", timeout=TIMEOUT_S).json()
    body = schema["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["additionalProperties"] is False and {"model", "prompt"} <= set(body["required"])
    cases, failures = http_fuzz(base, max_examples=25)
    assert cases >= 50 and failures == 0
    response = post(deployment.url, {"model": job.name, "prompt": "def f(x):", "max_tokens": 4, "temperature": 0})
    assert response.status_code == 200, response.text


def test_streaming_sends_the_same_text_as_a_plain_request(served):
    _, _, deployment = served
    request = {"model": "tiny-lm", "prompt": "class A:", "max_tokens": 12, "temperature": 0}
    plain = post(deployment.url, request).json()["choices"][0]["text"]
    response = post(deployment.url, {**request, "stream": True}, stream=True)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in response.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == plain
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_a_client_that_disconnects_mid_stream_does_not_hurt_the_replica(served):
    _, _, deployment = served
    host, port = deployment.url.split("//")[1].split("/")[0].split(":")
    body = json.dumps({"model": "tiny-lm", "prompt": "while", "max_tokens": 16, "stream": True}).encode()
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as connection:
        path = "/" + deployment.url.split("//")[1].split("/", 1)[1]
        connection.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert connection.recv(64).startswith(b"HTTP/1.1 200")
    with ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(
                lambda i: post(deployment.url, {"model": "tiny-lm", "prompt": f"x = {i}", "max_tokens": 6}), range(8)
            )
        )
    assert [r.status_code for r in responses] == [200] * 8


def test_a_deployment_that_can_never_fit_is_rejected_at_once(served, tiny_lm_checkpoint):
    admin, _, _ = served
    impossible = ServeJob(
        name="huge", team="prod", checkpoint=str(tiny_lm_checkpoint), resources={"cpus": 1, "gpus": 16}, pool="h100"
    )
    with pytest.raises(UserError, match="cannot be deployed: can never fit this cluster"):
        deploy(impossible, admin, port=free_port(), wait_s=5)
    assert not [s for s in admin.queue() if s.request.group == "huge"]


def test_delete_releases_the_bookings(served, tiny_lm_checkpoint):
    admin, _, deployment = served
    extra = research_job("extra-lm", tiny_lm_checkpoint, "cpu")
    port = port_of(deployment)
    deploy(extra, admin, port=port, wait_s=TIMEOUT_S)
    booked = [s for s in admin.queue() if s.request.group == "extra-lm"]
    assert [s.state for s in booked] == [RequestState.RUNNING]
    released = delete("extra-lm", admin)
    assert released == [booked[0].id]
    assert admin.status(booked[0].id).state is RequestState.FINISHED
    with pytest.raises(UserError, match=f"no deployment 'extra-lm'; deployments: {deployment.name} "):
        delete("extra-lm", admin)  # gone: refused, naming what there is, and nothing else is touched
    assert serve.status().applications[deployment.name].status.value == "RUNNING"


def test_a_name_already_deployed_is_refused_and_books_nothing(served):
    admin, job, _ = served
    before = [s.id for s in admin.queue() if s.request.group == job.name]
    refused = f"a deployment named '{job.name}' already runs .*llmos serve delete {job.name}"
    with pytest.raises(UserError, match=refused):
        deploy(job, admin, port=free_port(), wait_s=5)
    assert [s.id for s in admin.queue() if s.request.group == job.name] == before


def test_a_deployment_serve_cannot_run_in_time_releases_its_bookings_and_leaves_no_application(
    served, tiny_lm_checkpoint
):
    admin, _, deployment = served
    # Ray's CPUs on the h100 node are taken outside the controller's books: the replica it books there waits.
    (h100,) = [pool for pool in admin.pools() if pool.name == "h100"]
    holder = CpuHolder.options(num_cpus=h100.free["CPU"], label_selector={POOL_LABEL: "h100"}).remote()
    try:
        ray.get(holder.ready.remote(), timeout=TIMEOUT_S)
        stuck = research_job("stuck-lm", tiny_lm_checkpoint, "h100")
        port = port_of(deployment)
        with pytest.raises(UserError, match=r"Serve did not run stuck-lm within 5s .*the bookings are released"):
            deploy(stuck, admin, port=port, wait_s=5)
        assert not [s for s in admin.queue() if s.request.group == "stuck-lm"]
        assert "stuck-lm" not in serve.status().applications
    finally:
        ray.kill(holder)


@ray.remote
class CpuHolder:
    def ready(self) -> bool:
        return True


def serve_replicas(name: str) -> int:
    """Replica actors of the application alive in Ray, and Serve counting every one of them running."""
    alive = list_actors(filters=[("class_name", "=", f"ServeReplica:{name}:CompletionServer"), ("state", "=", "ALIVE")])
    application = serve.status().applications.get(name)
    running = 0
    if application is not None:
        (deployment,) = application.deployments.values()
        running = deployment.replica_states.get("RUNNING", 0)
    return len(alive) if len(alive) == running else -1


def replica_actors(name: str) -> set[str]:
    """The ids of the application's replica actors alive in Ray."""
    alive = list_actors(filters=[("class_name", "=", f"ServeReplica:{name}:CompletionServer"), ("state", "=", "ALIVE")])
    return {actor.actor_id for actor in alive}


def reconciled_replicas(name: str) -> int:
    return ray.get(find_reconciler(name).state.remote(), timeout=TIMEOUT_S)["replicas"]


# A prod training gang of 5 CPUs on the cpu pool: on cpu-0 (8 CPUs) beside replicas of 3, it takes one's booking.
CPU_BLOCKER = {
    "team": "prod",
    "priority": "high",
    "kind": "training",
    "gang": {"name": "blocker", "bundles": [{"resources": {"CPU": 5}, "label_selector": {POOL_LABEL: "cpu"}}]},
}


def test_a_preempted_replica_scales_the_deployment_down_and_it_comes_back(served, tiny_lm_checkpoint):
    admin, _, deployment = served
    # Two replicas of 3 CPUs on cpu-0 (8 CPUs); a prod gang of 5 CPUs can only be placed by taking one.
    job = research_job("elastic-lm", tiny_lm_checkpoint, "cpu", replicas={"min": 1, "max": 2}, resources={"cpus": 3})
    port = port_of(deployment)
    elastic = deploy(job, admin, port=port, wait_s=TIMEOUT_S)
    url = elastic.url
    try:
        assert elastic.replicas == 2
        wait_for(lambda: serve_replicas(job.name) == 2, what="two running replicas")
        before = replica_actors(job.name)
        blocker = admin.submit(CPU_BLOCKER)
        assert blocker.state is RequestState.PLACED, blocker.reason
        replicas = [admin.status(request_id) for request_id in elastic.requests]
        assert sorted(status.state.value for status in replicas) == ["preempted", "running"]
        wait_for(lambda: reconciled_replicas(job.name) == 1, what="the reconciler to scale down")
        wait_for(lambda: serve_replicas(job.name) == 1, what="Serve to run one replica")
        # Scaled down, not rolled out anew: the replica left is one of the two that ran, and it keeps running.
        (survivor,) = replica_actors(job.name)
        assert survivor in before
        # Ray's books agree with the controller's: the gang's placement group is reserved once Serve let go.
        ray.get(admin.placement_group(blocker.id).ready(), timeout=TIMEOUT_S)
        assert post(url, {"model": job.name, "prompt": "x", "max_tokens": 2}).status_code == 200

        admin.complete(blocker.id)
        wait_for(lambda: reconciled_replicas(job.name) == 2, what="the requeued replica to be placed again")
        wait_for(lambda: serve_replicas(job.name) == 2, what="Serve to run two replicas again")
        assert survivor in replica_actors(job.name)
        assert all(admin.status(request_id).state is RequestState.RUNNING for request_id in elastic.requests)
        assert post(url, {"model": job.name, "prompt": "x", "max_tokens": 2}).status_code == 200
    finally:
        released = delete(job.name, admin)
    assert sorted(released) == sorted(elastic.requests)
    assert serve_replicas(job.name) == 0


def replicas_by_node(name: str | None, admin: Admin) -> dict[str, int]:
    """How many of the application's replica actors (every application's, with None) run on each node, by llmos
    node name."""
    names = {node.node_id: node.name for node in admin.nodes()}
    alive = list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
    prefix = f"ServeReplica:{name}:" if name else "ServeReplica:"
    return dict(Counter(names.get(a.node_id, a.node_id) for a in alive if a.class_name.startswith(prefix)))


def test_replicas_running_where_they_are_not_booked_are_moved_to_the_books(served, tiny_lm_checkpoint):
    """A gang takes one of two replica bookings on cpu-0 and the replica is booked again on h100-0. Seen in one
    reconciler tick, that changes neither the count nor the nodes Serve may use, so Serve changes nothing; seen in
    two, Serve scales down by stopping a replica on the node with the fewest replicas of every application and
    starts one on any booked node with room. Either way a replica stays on cpu-0, where it is no longer booked,
    unless Serve's own pick was on cpu-0: the reconciler stops it, Ray hands its CPUs to the gang, and Serve
    starts it again where a booking has room."""
    admin, _, deployment = served
    job = research_job("spread-lm", tiny_lm_checkpoint, None, replicas={"min": 1, "max": 3}, resources={"cpus": 3})
    admin.cordon("a100-0")  # two replicas on cpu-0 (8 CPUs), the third on h100-0, the next smallest fit
    blocker = None
    try:
        spread = deploy(job, admin, port=port_of(deployment), wait_s=TIMEOUT_S)
        assert sorted(spread.nodes) == ["cpu-0", "cpu-0", "h100-0"]
        wait_for(lambda: replicas_by_node(job.name, admin) == {"cpu-0": 2, "h100-0": 1}, what="three replicas")
        every_application = replicas_by_node(None, admin)
        serve_picks_h100 = every_application.get("h100-0", 0) < every_application.get("cpu-0", 0)
        blocker = admin.submit(CPU_BLOCKER)
        assert blocker.state is RequestState.PLACED, blocker.reason
        # The replica taken off cpu-0 is booked again on h100-0 (bestfit's next smallest fit) once tried again.
        wait_for(lambda: all(admin.status(i).state.holding for i in spread.requests), what="it to be booked again")
        booked = Counter(node for request_id in spread.requests for node in admin.status(request_id).nodes)
        assert booked == {"cpu-0": 1, "h100-0": 2}
        wait_for(
            lambda: replicas_by_node(job.name, admin) == booked and serve_replicas(job.name) == 3,
            90,
            "the replicas to run where they are booked",
        )
        ray.get(admin.placement_group(blocker.id).ready(), timeout=TIMEOUT_S)
        changes = ray.get(find_reconciler(job.name).state.remote(), timeout=TIMEOUT_S)["changes"]
        moved = any("stopped_misplaced" in change for change in changes)
        assert moved or not serve_picks_h100, (every_application, changes)
        assert post(spread.url, {"model": job.name, "prompt": "x", "max_tokens": 2}).status_code == 200
    finally:
        admin.uncordon("a100-0")
        if blocker is not None:
            admin.cancel(blocker.id)
        delete(job.name, admin)
