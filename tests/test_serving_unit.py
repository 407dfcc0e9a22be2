"""Serving without a cluster: the batched decoder, request parsing and limits, the Serve config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ray.serve.schema import ServeDeploySchema

from cluster.requests import BundleBinding, RequestState, RequestStatus, SubmitRequest
from cluster.spec import SpecError
from jobs.data import VOCAB_SIZE, encode
from jobs.model import TransformerLM
from jobs.spec import ModelSize
from serving.api import ApiError, parse_completion
from serving.config import build_serve_config, replica_actor_options
from serving.decoding import BatchDecoder, Generation
from serving.reconcile import changed_bookings, misplaced_replica
from serving.spec import Limits, ServeJob, load_serve_job

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "serve.yaml"
LIMITS = Limits(max_tokens=32, max_prompt_bytes=64, max_body_bytes=1024)


@pytest.fixture(scope="module")
def model() -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(ModelSize(layers=2, d_model=32, heads=2, context_length=96), VOCAB_SIZE).eval()


def alone_greedy(model: TransformerLM, prompt: list[int], max_tokens: int) -> list[int]:
    """The model's own greedy continuation, cut where the decoder ends a request (a special token)."""
    (tokens,) = model.generate([prompt], max_tokens, temperature=0.0)
    for index, token in enumerate(tokens):
        if token >= 256:
            return tokens[:index]
    return tokens


def test_batched_decoding_equals_each_request_decoded_alone(model):
    prompts = [encode("def add(a, b):"), encode("import os\n"), encode("x")]
    budgets = [12, 5, 20]
    decoder = BatchDecoder(model)
    results = decoder.complete([Generation(p, m, temperature=0.0) for p, m in zip(prompts, budgets, strict=True)])
    for (tokens, reason), prompt, budget in zip(results, prompts, budgets, strict=True):
        expected = alone_greedy(model, prompt, budget)
        assert tokens == expected
        assert reason == ("length" if len(expected) == budget else "stop")


def test_stop_sequence_is_never_streamed_and_ends_the_request(model):
    prompt = encode("class A:")
    full = alone_greedy(model, prompt, 20)
    assert len(full) >= 8, "the fixture model should produce a long enough greedy continuation"
    stop = full[4:7]
    streamed: list[int] = []
    finish = None
    for (step,) in BatchDecoder(model).stream([Generation(prompt, 20, temperature=0.0, stop=[stop])]):
        if step is None:
            break
        streamed.extend(step.tokens)
        finish = step.finish_reason or finish
    first_match = next(i for i in range(len(full)) if full[i : i + 3] == stop)
    assert streamed == full[:first_match]
    assert finish == "stop"


def test_seeded_sampling_repeats_and_does_not_depend_on_the_batch(model):
    prompt = encode("for i in range(")
    sampled = Generation(prompt, 16, temperature=1.0, top_p=0.9, seed=7)
    decoder = BatchDecoder(model)
    alone = decoder.complete([sampled])[0]
    with_others = decoder.complete([Generation(encode("while True:"), 10, temperature=0.0), sampled])[1]
    assert alone == with_others == decoder.complete([sampled])[0]


def test_a_tiny_temperature_samples_the_top_token_instead_of_failing_the_batch(model):
    prompt = encode("def add(a, b):")
    greedy = alone_greedy(model, prompt, 8)
    results = BatchDecoder(model).complete(
        [Generation(prompt, 8, temperature=1e-39, seed=1), Generation(prompt, 8, temperature=1e-39, top_p=0.5, seed=2)]
    )
    assert [tokens for tokens, _ in results] == [greedy, greedy]


def test_request_over_the_context_is_refused(model):
    with pytest.raises(ValueError, match="exceeds the model's context of 96"):
        list(BatchDecoder(model).stream([Generation([65] * 90, 10)]))


def body(**fields) -> bytes:
    return json.dumps({"model": "lm", "prompt": "def f():", **fields}).encode()


@pytest.mark.parametrize(
    ("raw", "status", "message"),
    [
        (b"x" * 2000, 413, "request body is 2000 bytes; the limit is 1024"),
        (b'{"model": "lm", "prompt": "\xff\xfe"}', 400, "not UTF-8"),
        (b'{"model": "lm", "prompt": ', 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (body(temprature=0.5), 400, "temprature: unknown field (did you mean 'temperature'?)"),
        (body(model="gpt-4"), 404, "model 'gpt-4' does not exist"),
        (body(max_tokens=0), 400, "max_tokens must be between 1 and 32, got 0"),
        (body(max_tokens=10**9), 400, "max_tokens must be between 1 and 32"),
        (body(prompt="y" * 65), 400, "prompt is 65 bytes; the limit is 64"),
        (body(prompt=""), 400, "prompt is empty"),
        (body(temperature=3), 400, "temperature: Input should be less than or equal to 2"),
        (body(stop=["a", "b", "c", "d", "e"]), 400, "at most 4 stop sequences"),
        (body(stream="yes please"), 400, "stream"),
        (json.dumps({"prompt": "x"}).encode(), 400, "model: required field is missing"),
        (body(prompt="a\ud800b"), 400, "prompt: holds a lone UTF-16 surrogate (\\ud800) at character 1"),
        (body(stop=["\udc00"]), 400, "stop: holds a lone UTF-16 surrogate (\\udc00) at character 0"),
        (body(seed=2**64), 400, "seed: Input should be less than or equal to 18446744073709551615"),
        (body(seed=-1), 400, "seed: Input should be greater than or equal to 0"),
        (body(max_tokens=True), 400, "max_tokens: Input should be a valid integer"),
    ],
)
def test_bad_requests_get_openai_style_errors(raw, status, message):
    with pytest.raises(ApiError) as caught:
        parse_completion(raw, LIMITS, "lm")
    assert caught.value.status == status
    assert message in caught.value.message
    error = caught.value.body()["error"]
    assert error["type"] == "invalid_request_error" and message in error["message"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"model": "lm", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "not usable JSON: Exceeds the limit"),
        (b"[" * 5000 + b"]" * 5000, "not usable JSON: it nests too deeply"),
    ],
)
def test_json_python_cannot_read_within_the_default_body_limit_is_a_bad_request(raw, message):
    with pytest.raises(ApiError) as caught:
        parse_completion(raw, Limits(), "lm")
    assert caught.value.status == 400 and message in caught.value.message


def test_valid_request_parses():
    request = parse_completion(body(max_tokens=8, stop="\n", temperature=0, seed=2**64 - 1), LIMITS, "lm")
    assert (request.max_tokens, request.stop, request.temperature, request.seed) == (8, ["\n"], 0.0, 2**64 - 1)
    assert parse_completion(body(), LIMITS, "lm").max_tokens == 16  # OpenAI's default
    assert parse_completion(body(), LIMITS.model_copy(update={"max_tokens": 4}), "lm").max_tokens == 4
    assert parse_completion(body(), LIMITS, "lm").stop == []
    assert parse_completion(body(stop=None), LIMITS, "lm").stop == []
    assert parse_completion(body(stop=["a", "b"]), LIMITS, "lm").stop == ["a", "b"]


def test_serve_config_is_valid_for_rays_own_serve_deploy():
    job = load_serve_job(EXAMPLE)
    config = build_serve_config(job)
    ServeDeploySchema.model_validate(config)
    (application,) = config["applications"]
    assert application["import_path"] == "serving.app:build_app"
    assert application["deployments"][0]["ray_actor_options"]["label_selector"] == {"llmos.io/pool": "a100"}
    booked = [
        BundleBinding(bundle_index=0, node=node, node_id=node_id, pool="a100", resources={}, group_bundle_index=0)
        for node, node_id in [("a100-1", "id1"), ("a100-0", "id0"), ("a100-0", "id0")]
    ]
    pinned = replica_actor_options(job, booked)
    assert pinned["label_selector"] == {"ray.io/node-id": "in(id0,id1)"}  # every Ray node has this label
    restored = [bundle.model_copy(update={"node_id": ""}) for bundle in booked[:2]]  # books from before ids
    assert replica_actor_options(job, restored)["label_selector"] == {"llmos.io/node": "in(a100-0,a100-1)"}


def test_serve_job_errors_name_the_field(tmp_path):
    bad = tmp_path / "serve.yaml"
    bad.write_text("name: x\nteam: research\ncheckpoint: /tmp/c\nreplicas: {min: 3, max: 1}\nreplica: 2\n")
    with pytest.raises(SpecError) as caught:
        load_serve_job(bad)
    problems = "\n".join(caught.value.problems)
    assert "replicas: min (3) is above max (1)" in problems
    assert "replica: unknown field (did you mean 'replicas'?)" in problems
    with pytest.raises(ValueError, match="set pool or accelerator_type, not both"):
        ServeJob(name="x", team="t", checkpoint="/c", pool="a100", accelerator_type="A100-80G", resources={"gpus": 1})
    with pytest.raises(ValueError, match=r"resources\.memory"):  # as a TrainingJob's: a replica needs some memory
        ServeJob(name="x", team="t", checkpoint="/c", resources={"memory": 0})


def booked_replica(node: str, node_id: str, state: RequestState = RequestState.RUNNING) -> RequestStatus:
    bundle = BundleBinding(bundle_index=0, node=node, node_id=node_id, pool="cpu", resources={}, group_bundle_index=0)
    return RequestStatus(
        id="research-00001",
        request=SubmitRequest(team="research", gang={"name": "replica", "bundles": [{"resources": {"CPU": 1}}]}),
        priority_value=500,
        state=state,
        bundles=[bundle],
        submitted_seq=1,
        submitted_at=0.0,
    )


def test_replicas_follow_a_node_that_came_back_under_its_old_name_with_a_new_ray_id():
    before = booked_replica("cpu-0", "id-before")
    pins = [bundle.pin for bundle in before.bundles]
    assert changed_bookings([before], pins) is None  # as deployed
    # cpu-0 restarted: the replica was requeued and placed there again, on a node Ray knows by a new id.
    after = booked_replica("cpu-0", "id-after")
    assert [bundle.pin for bundle in changed_bookings([after], pins)] == [{"ray.io/node-id": "id-after"}]
    # Every replica off its node: Serve keeps what it has until one is placed again.
    assert changed_bookings([booked_replica("cpu-0", "id-after", RequestState.PREEMPTED)], pins) is None


def test_the_replica_to_move_is_one_on_a_node_running_more_than_its_bookings_while_another_runs_fewer():
    def booked(*nodes: str) -> list[BundleBinding]:
        return [bundle for node in nodes for bundle in booked_replica(node, f"id-{node}").bundles]

    # Serve shrank 3 -> 2 by stopping h100-0's replica, while cpu-0 lost the booking.
    running = [("r1", "id-cpu-0"), ("r2", "id-cpu-0")]
    assert misplaced_replica(booked("cpu-0", "h100-0"), running) in {"r1", "r2"}
    assert misplaced_replica(booked("cpu-0", "h100-0"), [("r1", "id-cpu-0"), ("r3", "id-h100-0")]) is None
    assert misplaced_replica(booked("cpu-0", "cpu-0"), running) is None
    # A replica on a node with no booking at all is misplaced too.
    assert misplaced_replica(booked("cpu-0", "h100-0"), [("r1", "id-cpu-0"), ("r4", "id-a100-0")]) == "r4"
    # Books without Ray's node ids cannot be compared with where Ray runs the replicas.
    without_ids = [bundle.model_copy(update={"node_id": ""}) for bundle in booked("cpu-0", "h100-0")]
    assert misplaced_replica(without_ids, running) is None
