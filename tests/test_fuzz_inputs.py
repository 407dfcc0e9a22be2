"""Fuzzed bad input: every generated spec, job, request or admin call is either valid or rejected with a
message that names the field; nothing ever escapes as another exception (a traceback for the user).

Inputs are the shipped examples mutated by hypothesis: keys deleted, misspelt or added, values swapped
for other types, negative or huge numbers, odd strings, nested junk; and admin calls with random ids,
teams, nodes and quota changes against the controller's books.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yaml_trees import parent_of, paths

from cluster.console import UserError
from cluster.placement.snapshot import NodeSnapshot
from cluster.requests import SubmitRequest
from cluster.scheduler import Scheduler
from cluster.spec import ClusterSpec, SpecError, load_spec, parse_model
from jobs.spec import TrainingJob
from serving.spec import ServeJob

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CLUSTER = yaml.safe_load((EXAMPLES / "cluster.yaml").read_text())
TRAIN = yaml.safe_load((EXAMPLES / "train.yaml").read_text())
SERVE = yaml.safe_load((EXAMPLES / "serve.yaml").read_text())
REQUEST = {
    "team": "research",
    "kind": "training",
    "gang": {"name": "g", "constraint": "same_pool", "bundles": [{"resources": {"CPU": 2, "GPU": 4}}] * 2},
}
CASES = 600  # per input kind; four kinds and the admin calls make well over 2,000 cases

# A problem names its field: a path such as `pools[1].node.gpu:` or `teams[0].quota:`, or (for
# whole-document problems) says what the top level must be.
_KEY = r"""\[(?:\d+|"(?:[^"\\]|\\.)*")\]"""  # [3] or a quoted key, quotes in it escaped: ["a\"b"]
FIELD_PATH = re.compile(rf"^(?:[A-Za-z_][\w\-:/.]*|{_KEY})(?:\.[A-Za-z_][\w\-:/.]*|{_KEY})*: \S")
TOP_LEVEL = ("expected a mapping", "set pool or accelerator_type", "accelerator_type is set")

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", "-1", "32Gi", "4x4", "h100", "H100", "!x", "in(a,b)", "gpu:H100", "\x00", "ⅷ"]),
)
junk = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def mutated(draw, example: dict, rounds: int = 3):
    data = copy.deepcopy(example)
    for _ in range(draw(st.integers(min_value=1, max_value=rounds))):
        path = draw(st.sampled_from(list(paths(data))))
        if not path:
            continue
        parent, key = parent_of(data, path), path[-1]
        operation = draw(st.sampled_from(["delete", "replace", "misspell", "add", "negate"]))
        if operation == "delete":
            del parent[key]
        elif operation == "replace":
            parent[key] = draw(junk)
        elif operation == "misspell" and isinstance(parent, dict):
            parent[f"{key}s" if not str(key).endswith("s") else str(key)[:-1]] = parent.pop(key)
        elif operation == "add" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(junk)
        elif operation == "negate" and isinstance(parent[key], int | float) and not isinstance(parent[key], bool):
            parent[key] = -parent[key] - 1
    return data


def accepted_or_named(model, data) -> None:
    try:
        parse_model(model, data, "fuzz.yaml")
    except SpecError as error:
        assert error.problems, "a rejection must say why"
        for problem in error.problems:
            assert FIELD_PATH.match(problem) or problem.startswith(TOP_LEVEL), f"problem names no field: {problem!r}"


fuzz = settings(max_examples=CASES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz
@given(mutated(CLUSTER))
def test_fuzzed_cluster_specs(data):
    accepted_or_named(ClusterSpec, data)


@fuzz
@given(mutated(TRAIN))
def test_fuzzed_training_jobs(data):
    accepted_or_named(TrainingJob, data)


@fuzz
@given(mutated(SERVE))
def test_fuzzed_serve_jobs(data):
    accepted_or_named(ServeJob, data)


@fuzz
@given(mutated(REQUEST, rounds=4))
def test_fuzzed_admin_requests(data):
    accepted_or_named(SubmitRequest, data)


NODES = [
    NodeSnapshot(name="cpu-0", pool="cpu", labels={"llmos.io/pool": "cpu"}, cpus=8, memory=2**35),
    NodeSnapshot(
        name="h100-0",
        pool="h100",
        labels={"llmos.io/pool": "h100", "ray.io/accelerator-type": "H100"},
        cpus=26,
        memory=2**37,
        gpus=8,
        gpu_type="H100",
    ),
]
names = st.one_of(
    st.text(max_size=10), st.sampled_from(["research", "prod", "cpu-0", "h100-0", "head-0", "research-00001"])
)
quota_changes = st.dictionaries(
    st.one_of(st.sampled_from(["gpu", "cpu", "tpu", "memory", "gpu:H100", "gpus"]), st.text(max_size=6)),
    st.one_of(st.none(), st.floats(allow_nan=False, min_value=-10, max_value=1e6), st.integers(-5, 100)),
    max_size=3,
)
calls = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), mutated(REQUEST, rounds=2)),
        st.tuples(st.sampled_from(["cancel", "preempt", "get", "complete"]), names),
        st.tuples(st.sampled_from(["cordon", "drain"]), names),
        st.tuples(st.just("set_quota"), st.tuples(names, quota_changes)),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls)
def test_fuzzed_admin_calls_change_the_books_only_when_accepted(sequence):
    books = Scheduler(load_spec(EXAMPLES / "cluster.yaml"), "bestfit")
    books.set_nodes(NODES)
    for name, argument in sequence:
        before = (copy.deepcopy(books.requests), copy.deepcopy(books.quotas), copy.deepcopy(books.controls))
        try:
            if name == "submit":
                try:
                    request = parse_model(SubmitRequest, argument, "request")
                except SpecError:
                    continue
                books.submit(request)
            elif name == "set_quota":
                books.set_quota(*argument)
            elif name == "get":
                books.get(argument)
            else:
                getattr(books, name)(argument)
            books.schedule()
        except UserError as error:
            assert str(error), "a refusal must say why"
            assert (books.requests, books.quotas, books.controls) == before, f"{name} was refused but changed the books"
        for team, used in books.usage.items():
            for key, amount in used.items():
                assert amount <= books.quotas[team].get(key, float("inf")) + 1e-6, f"{team} over its {key} quota"
